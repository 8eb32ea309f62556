//! Attention for training (LoRA): the forward of [`super::attention`] (no `[N, M]` score
//! matrix kept) with its own backward, which recomputes the scores block by block, as
//! FlashAttention's backward does (an AVX-512 kernel; candle ops a few heads at a time on other
//! CPUs). candle's differentiable composition (`q·kᵀ`, scale, the
//! softmax's max / subtract / exp / sum / divide, `·v`) keeps five `B·H·N·M` tensors alive per
//! attention until the backward has run; at 64×64 latents that is 0.5 GB per self-attention.
//!
//! With `O = P·V`, `P = softmax(s·Q·Kᵀ)` and the output gradient `dO`:
//! `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = s·dS·K`, `dK = s·dSᵀ·Q`.

use candle_core::{CpuStorage, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor};

use super::attention::AttentionOp;
use super::simd::has_avx512;
use super::{on_cpu, with_f32s};

/// Score elements recomputed at once in the backward (a few heads at a time): 8 MiB of f32.
const CHUNK: usize = 1 << 21;

/// `softmax(q·kᵀ·scale)·v` per head for `q` `[B, N, H·d]` and `k`, `v` `[B, M, H·d]` (the
/// projections' token layout; f32, CPU) when a gradient flows through them, as an op with its
/// own backward; the result is `[B, N, H·d]`, the heads merged. `None` otherwise (inference uses
/// [`super::attention::attention`], other dtypes and devices the plain composition). Taking the
/// token layout keeps the head split and merge (eight reshapes and transposes per attention,
/// each a copy in the backward) out of the autograd graph.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if !tracked || !on_cpu(&[q, k, v]) || [q.dtype(), k.dtype(), v.dtype()] != [DType::F32; 3] {
        return Ok(None);
    }
    let (Ok((b, _, inner)), Ok((kb, m, kinner))) = (q.dims3(), k.dims3()) else { return Ok(None) };
    if heads == 0 || !inner.is_multiple_of(heads) || (kb, kinner) != (b, inner) || v.dims() != k.dims() || m == 0 {
        return Ok(None);
    }
    let op = TrainAttentionOp { heads, scale: scale as f32, lse: std::sync::Mutex::new(None) };
    Ok(Some(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?))
}

/// The op on contiguous `(q [B, N, H·d], k [B, M, H·d], v [B, M, H·d])`; the result is
/// `[B, N, H·d]`.
#[derive(Debug)]
struct TrainAttentionOp {
    heads: usize,
    scale: f32,
    /// Each query's base-2 log-sum-exp from the AVX-512 forward (`[B, H, N]`), for the backward.
    lse: std::sync::Mutex<Option<Vec<f32>>>,
}

impl TrainAttentionOp {
    /// The `[B, H, len, d]` view of a contiguous `[B, len, H·d]` layout.
    fn heads_view(&self, l: &Layout) -> Result<Layout> {
        let (b, len, inner) = l.shape().dims3()?;
        let d = inner / self.heads;
        Ok(Layout::new((b, self.heads, len, d).into(), vec![len * inner, d, inner, 1], l.start_offset()))
    }
}

impl CustomOp3 for TrainAttentionOp {
    fn name(&self) -> &'static str {
        "easyphoto-attention-train"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if has_avx512() {
            let (qv, kv, vv) = (self.heads_view(ql)?, self.heads_view(kl)?, self.heads_view(vl)?);
            // [B, N, H, d] out, which is [B, N, H·d].
            let (b, h, n, _) = qv.shape().dims4()?;
            let mut lse = vec![0f32; b * h * n];
            let op = AttentionOp { scale: self.scale };
            let (storage, _) = op.forward((qs, &qv), (ks, &kv), (vs, &vv), Some(&mut lse))?;
            *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
            return Ok((storage, ql.shape().clone()));
        }
        let heads = |s: &CpuStorage, l: &Layout| -> Result<Tensor> {
            let (b, len, inner) = l.shape().dims3()?;
            let t = Tensor::from_slice(super::f32_data(s, l)?, (b, len, self.heads, inner / self.heads), &Device::Cpu)?;
            t.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (heads(qs, ql)?, heads(ks, kl)?, heads(vs, vl)?);
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * f64::from(self.scale))?)?;
        let out = p.matmul(&v)?.transpose(1, 2)?.contiguous()?;
        Ok((CpuStorage::F32(out.flatten_all()?.to_vec1()?), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = super::profile::scope("attention backward");
        let (b, n, inner) = q.dims3()?;
        let (m, h) = (k.dim(1)?, self.heads);
        let d = inner / h;
        let grad = grad.detach().contiguous()?;
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            let dims = Dims { b, h, n, m, d };
            return with_f32s([q, k, v, res, &grad], |[qd, kd, vd, od, gd]| {
                // SAFETY: AVX-512 is present; the buffers are contiguous [B, N|M, H·d].
                let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
                let (dq, dk, dv) = unsafe { x86::backward(qd, kd, vd, (od, gd, lse.as_deref()), dims, self.scale) };
                let dev = q.device();
                Ok((
                    Some(Tensor::from_vec(dq, q.shape(), dev)?),
                    Some(Tensor::from_vec(dk, k.shape(), dev)?),
                    Some(Tensor::from_vec(dv, v.shape(), dev)?),
                ))
            });
        }
        let split = |t: &Tensor| t.detach().reshape((b, t.dim(1)?, h, d))?.transpose(1, 2);
        let merge = |t: Option<Tensor>| -> Result<Option<Tensor>> {
            t.map(|t| t.transpose(1, 2)?.reshape((b, t.dim(2)?, inner))).transpose()
        };
        let (dq, dk, dv) =
            composed_backward(&split(q)?, &split(k)?, &split(v)?, &split(res)?, &split(&grad)?, f64::from(self.scale))?;
        Ok((merge(dq)?, merge(dk)?, merge(dv)?))
    }
}

/// The backward as candle ops, a few heads at a time (CPUs without AVX-512).
fn composed_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (_, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let heads = (CHUNK / (n * m).max(1)).clamp(1, h);
    let (mut dq, mut dk, mut dv) = (vec![], vec![], vec![]);
    for h0 in (0..h).step_by(heads) {
        let hc = heads.min(h - h0);
        let part = |t: &Tensor| t.narrow(1, h0, hc)?.contiguous();
        let (q, k, v, o, go) = (part(q)?, part(k)?, part(v)?, part(out)?, part(grad)?);
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
        dv.push(p.t()?.contiguous()?.matmul(&go)?);
        let rowsum = (&go * &o)?.sum_keepdim(D::Minus1)?;
        let ds = (go.matmul(&v.t()?)?.broadcast_sub(&rowsum)? * &p)?;
        drop(p);
        dq.push((ds.matmul(&k)? * scale)?);
        dk.push((ds.t()?.contiguous()?.matmul(&q)? * scale)?);
    }
    Ok((Some(Tensor::cat(&dq, 1)?), Some(Tensor::cat(&dk, 1)?), Some(Tensor::cat(&dv, 1)?)))
}

/// Batch, heads, queries, keys and head width.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    n: usize,
    m: usize,
    d: usize,
}

/// The backward kernel. Work is split into tasks of one (batch, head) and a range of queries;
/// a task packs `K` and `V` transposed (`[d, M]`, keys along the vector lanes, so any head
/// width works), takes each query's log-sum-exp from the forward (or recomputes it when a second
/// backward finds it already taken), then walks blocks of keys that fit in L2
/// with groups of eight queries: scores, probabilities, `dP`, `dS`, and the three products, with
/// `dK` / `dV` accumulated per task (summed over a head's tasks at the end).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles index several arrays by row
mod x86 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::Dims;
    use std::f32::consts::{LN_2, LOG2_E};

    use crate::cpu::attention::x86::{exp_row, exp2, row_max};

    /// Queries per register tile.
    const R: usize = 8;
    /// Lanes per vector.
    const L: usize = 16;

    /// `(dQ, dK, dV)` in the token layout `[B, N|M, H·d]` of the inputs, from them, the output,
    /// its gradient and (when the forward kept it) each query's log-sum-exp `[B, H, N]`.
    ///
    /// # Safety
    /// AVX-512F must be available and the slices must hold the shapes of `dims`.
    pub(super) unsafe fn backward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (o, go, lse): (&[f32], &[f32], Option<&[f32]>),
        Dims { b, h, n, m, d }: Dims,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let inner = h * d;
        // Enough tasks for every thread, each with at least 64 queries.
        let threads = rayon::current_num_threads();
        let splits = (2 * threads).div_ceil(b * h).clamp(1, n.div_ceil(64).max(1));
        let rows = n.div_ceil(splits);
        let span = |t: usize| {
            let s = t % splits;
            ((s * rows).min(n), ((s + 1) * rows).min(n))
        };
        let parts: Vec<Part> = (0..b * h * splits)
            .into_par_iter()
            .map(|t| {
                let (bi, hi) = (t / splits / h, t / splits % h);
                let (r0, r1) = span(t);
                let at = |data, len: usize, first: usize, count| Rows {
                    data,
                    start: (bi * len + first) * inner + hi * d,
                    stride: inner,
                    d,
                    count,
                };
                let io = Head {
                    q: at(q, n, r0, r1 - r0),
                    o: at(o, n, r0, r1 - r0),
                    go: at(go, n, r0, r1 - r0),
                    lse: lse.map(|l| &l[(bi * h + hi) * n + r0..(bi * h + hi) * n + r1]),
                };
                // SAFETY: the caller guarantees AVX-512F.
                unsafe { task(&io, at(k, m, 0, m), at(v, m, 0, m), scale) }
            })
            .collect();
        let mut dq = vec![0f32; b * n * inner];
        let (mut dk, mut dv) = (vec![0f32; b * m * inner], vec![0f32; b * m * inner]);
        for (t, part) in parts.into_iter().enumerate() {
            let (bi, hi) = (t / splits / h, t / splits % h);
            let (r0, _) = span(t);
            for (i, row) in part.dq.chunks_exact(d).enumerate() {
                dq[(bi * n + r0 + i) * inner + hi * d..][..d].copy_from_slice(row);
            }
            let ld = part.dkt.len() / d.max(1);
            // dK was accumulated against the base-2 queries.
            for (dst, src, f) in [(&mut dk, &part.dkt, LN_2), (&mut dv, &part.dvt, 1.0)] {
                for j in 0..m {
                    let row = &mut dst[(bi * m + j) * inner + hi * d..][..d];
                    for (c, x) in row.iter_mut().enumerate() {
                        *x += f * src[c * ld + j];
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    /// `count` rows of `d` values, `stride` apart from `start`.
    #[derive(Clone, Copy)]
    struct Rows<'a> {
        data: &'a [f32],
        start: usize,
        stride: usize,
        d: usize,
        count: usize,
    }

    impl<'a> Rows<'a> {
        fn row(&self, i: usize) -> &'a [f32] {
            &self.data[self.start + i * self.stride..][..self.d]
        }
    }

    /// One task's queries, outputs, output gradients, and the queries' base-2 log-sum-exp
    /// when the forward kept it.
    struct Head<'a> {
        q: Rows<'a>,
        o: Rows<'a>,
        go: Rows<'a>,
        lse: Option<&'a [f32]>,
    }

    /// One task's results: its rows of `dQ` (`[rows, d]`) and its share of `dKᵀ`, `dVᵀ` (`[d, M]`
    /// padded).
    struct Part {
        dq: Vec<f32>,
        dkt: Vec<f32>,
        dvt: Vec<f32>,
    }

    #[target_feature(enable = "avx512f")]
    fn task(io: &Head, k: Rows, v: Rows, scale: f32) -> Part {
        let (rows, m, d) = (io.q.count, k.count, k.d);
        // Keys padded to whole vectors; rows of the `[d, M]` buffers one vector apart from a
        // multiple of 4 KiB (power-of-two row strides alias in L1).
        let mp = m.div_ceil(L) * L;
        let ld = mp + L;
        let transpose = |x: Rows| {
            let mut t = vec![0f32; d * ld];
            for j in 0..m {
                for (c, &val) in x.row(j).iter().enumerate() {
                    t[c * ld + j] = val;
                }
            }
            t
        };
        let (kt, vt) = (transpose(k), transpose(v));
        // Rows padded to whole tiles with zeros (a zero query with a zero gradient adds nothing).
        // Queries are pre-scaled by `scale · log2 e`, so that scores are in base 2.
        let groups = rows.div_ceil(R);
        let mut qs = vec![0f32; groups * R * d];
        let mut gs = vec![0f32; groups * R * d];
        // D_i = dO_i · O_i.
        let mut dd = vec![0f32; groups * R];
        for i in 0..rows {
            for (dst, &x) in qs[i * d..][..d].iter_mut().zip(io.q.row(i)) {
                *dst = x * scale * LOG2_E;
            }
            gs[i * d..][..d].copy_from_slice(io.go.row(i));
            dd[i] = io.go.row(i).iter().zip(io.o.row(i)).map(|(g, o)| g * o).sum();
        }
        // Each query's log-sum-exp (base 2) over all keys: the forward's, or recomputed.
        let mut lse = vec![0f32; groups * R];
        match io.lse {
            Some(l) => lse[..rows].copy_from_slice(l),
            None => {
                let mut s = vec![0f32; R * ld];
                for g in 0..groups {
                    rows_times_t(&qs[g * R * d..], (&kt, ld), 0, mp, d, (&mut s, ld));
                    for r in 0..R {
                        let row = s[r * ld..][..m].as_mut_ptr();
                        // SAFETY: AVX-512F (this function's feature); `row` holds `m` scores,
                        // which `exp_row` may overwrite (they are not used again).
                        lse[g * R + r] = unsafe {
                            let max = row_max(row, m);
                            max + exp_row(row, m, max).log2()
                        };
                    }
                }
            }
        }
        let kb = ((16384 / d.max(1)) / L * L).clamp(L, 512).min(mp);
        let kl = kb + L;
        let (mut p, mut ds) = (vec![0f32; R * kl], vec![0f32; R * kl]);
        let mut dq = vec![0f32; groups * R * d];
        let (mut dkt, mut dvt) = (vec![0f32; d * ld], vec![0f32; d * ld]);
        for j0 in (0..mp).step_by(kb) {
            let w = kb.min(mp - j0);
            let valid = m.saturating_sub(j0).min(w);
            for g in 0..groups {
                let (qg, gg) = (&qs[g * R * d..][..R * d], &gs[g * R * d..][..R * d]);
                rows_times_t(qg, (&kt, ld), j0, w, d, (&mut p, kl));
                rows_times_t(gg, (&vt, ld), j0, w, d, (&mut ds, kl));
                for r in 0..R {
                    let (l, di) = (lse[g * R + r], dd[g * R + r]);
                    probabilities(&mut p[r * kl..][..w], &mut ds[r * kl..][..w], valid, l, di);
                }
                rows_dot_t((&ds, kl), (&kt, ld), j0, w, d, &mut dq[g * R * d..][..R * d]);
                t_plus_rows((&mut dkt, ld), j0, w, d, qg, (&ds, kl));
                t_plus_rows((&mut dvt, ld), j0, w, d, gg, (&p, kl));
            }
        }
        dq.truncate(rows * d);
        for x in &mut dq {
            *x *= scale;
        }
        Part { dq, dkt, dvt }
    }

    /// For one query row of a key block: `p = 2^(s − lse)` over the `valid` keys (0 past
    /// them) in place of the scores `p`, and `dS = p · (dP − D)` in place of `dP` in `ds`.
    #[target_feature(enable = "avx512f")]
    fn probabilities(p: &mut [f32], ds: &mut [f32], valid: usize, lse: f32, d: f32) {
        assert!(p.len() == ds.len() && p.len().is_multiple_of(L) && valid <= p.len());
        let (lv, dv) = (_mm512_set1_ps(lse), _mm512_set1_ps(d));
        for j in (0..p.len()).step_by(L) {
            let mask = (!0u16).checked_shr((j + L).saturating_sub(valid) as u32).unwrap_or(0);
            unsafe {
                let (pp, dp) = (p.as_mut_ptr().add(j), ds.as_mut_ptr().add(j));
                let prob = _mm512_maskz_mov_ps(mask, exp2(_mm512_sub_ps(_mm512_loadu_ps(pp), lv)));
                _mm512_storeu_ps(pp, prob);
                _mm512_storeu_ps(dp, _mm512_mul_ps(prob, _mm512_sub_ps(_mm512_loadu_ps(dp), dv)));
            }
        }
    }

    /// `out[r][j] = Σ_c a[r][c] · t[c][j0 + j]` for the `R` rows of `a` (`[R, d]`) and `j < w`
    /// (`t` is `[d, ·]` and `out` `[R, ·]`, each with its row stride).
    #[target_feature(enable = "avx512f")]
    fn rows_times_t(
        a: &[f32],
        (t, ld): (&[f32], usize),
        j0: usize,
        w: usize,
        d: usize,
        (out, ol): (&mut [f32], usize),
    ) {
        assert!(a.len() >= R * d && t.len() >= d * ld && j0 + w <= ld && out.len() >= R * ol && w <= ol);
        for jc in (0..w).step_by(L) {
            let mut acc = [_mm512_setzero_ps(); R];
            for c in 0..d {
                let tv = unsafe { _mm512_loadu_ps(t.as_ptr().add(c * ld + j0 + jc)) };
                for r in 0..R {
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *a.get_unchecked(r * d + c) }), tv, acc[r]);
                }
            }
            for r in 0..R {
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * ol + jc), acc[r]) };
            }
        }
    }

    /// `out[r][c] += Σ_j x[r][j] · t[c][j0 + j]` (`x` `[R, ·]`, `t` `[d, ·]`, `out` `[R, d]`).
    #[target_feature(enable = "avx512f")]
    fn rows_dot_t((x, xl): (&[f32], usize), (t, ld): (&[f32], usize), j0: usize, w: usize, d: usize, out: &mut [f32]) {
        assert!(x.len() >= R * xl && w <= xl && t.len() >= d * ld && j0 + w <= ld && out.len() >= R * d);
        for c in 0..d {
            let mut acc = [_mm512_setzero_ps(); R];
            for jc in (0..w).step_by(L) {
                let tv = unsafe { _mm512_loadu_ps(t.as_ptr().add(c * ld + j0 + jc)) };
                for r in 0..R {
                    let xv = unsafe { _mm512_loadu_ps(x.as_ptr().add(r * xl + jc)) };
                    acc[r] = _mm512_fmadd_ps(xv, tv, acc[r]);
                }
            }
            for r in 0..R {
                out[r * d + c] += _mm512_reduce_add_ps(acc[r]);
            }
        }
    }

    /// `t[c][j0 + j] += Σ_r a[r][c] · x[r][j]` (`a` `[R, d]`, `x` `[R, ·]`); eight channels at a
    /// time, so that eight independent FMA chains hide the latency.
    #[target_feature(enable = "avx512f")]
    fn t_plus_rows((t, ld): (&mut [f32], usize), j0: usize, w: usize, d: usize, a: &[f32], (x, xl): (&[f32], usize)) {
        const C: usize = 8;
        assert!(a.len() >= R * d && t.len() >= d * ld && j0 + w <= ld && x.len() >= R * xl && w <= xl);
        let a_at = |r: usize, c: usize| _mm512_set1_ps(unsafe { *a.get_unchecked(r * d + c) });
        let base = t.as_mut_ptr();
        for jc in (0..w).step_by(L) {
            let xv: [__m512; R] = std::array::from_fn(|r| unsafe { _mm512_loadu_ps(x.as_ptr().add(r * xl + jc)) });
            let at = |c: usize| unsafe { base.add(c * ld + j0 + jc) };
            let mut c = 0;
            while c + C <= d {
                let mut acc: [__m512; C] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(at(c + i)) });
                for r in 0..R {
                    for i in 0..C {
                        acc[i] = _mm512_fmadd_ps(a_at(r, c + i), xv[r], acc[i]);
                    }
                }
                for i in 0..C {
                    unsafe { _mm512_storeu_ps(at(c + i), acc[i]) };
                }
                c += C;
            }
            for c in c..d {
                let mut acc = unsafe { _mm512_loadu_ps(at(c)) };
                for r in 0..R {
                    acc = _mm512_fmadd_ps(a_at(r, c), xv[r], acc);
                }
                unsafe { _mm512_storeu_ps(at(c), acc) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    /// Gradients of `Σ w ⊙ attention(q, k, v)` by the op and by candle's composition.
    #[test]
    fn gradients_match_the_composition() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // Head widths 8, 40 and 13; key counts off the 16-lane grid; one head over several tasks.
        for (b, h, n, m, d) in [(2, 3, 37, 37, 8), (2, 3, 50, 9, 8), (1, 2, 1100, 1000, 40), (1, 1, 300, 77, 13)] {
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, h * d), &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, m, h * d), &dev)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, m, h * d), &dev)?)?;
            let w = Tensor::randn(0f32, 1.0, (b, n, h * d), &dev)?;
            let scale = (d as f64).powf(-0.5);
            let ours = super::attention(&q, &k, &v, h, scale)?.expect("applies to tracked f32 CPU tensors");
            let split = |t: &Tensor| t.reshape((b, t.dim(1)?, h, d))?.transpose(1, 2)?.contiguous();
            let (qh, kh, vh) = (split(&q)?, split(&k)?, split(&v)?);
            let p = candle_nn::ops::softmax(&(qh.matmul(&kh.t()?)? * scale)?, candle_core::D::Minus1)?;
            let plain = p.matmul(&vh)?.transpose(1, 2)?.reshape((b, n, h * d))?;
            let max_abs = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
                (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
            };
            assert!(max_abs(&ours, &plain)? < 1e-5);
            let (g1, g2) = ((&ours * &w)?.sum_all()?.backward()?, (plain * &w)?.sum_all()?.backward()?);
            // A second backward through the same graph recomputes the log-sum-exp the first took.
            let g3 = (&ours * &w)?.sum_all()?.backward()?;
            for var in [&q, &k, &v] {
                let want = g2.get(var).expect("gradient");
                for got in [&g1, &g3] {
                    let err = max_abs(got.get(var).expect("gradient"), want)?;
                    assert!(err < 1e-5, "n {n} m {m} d {d}: {err}");
                }
            }
            // The candle-op fallback (CPUs without AVX-512) against the same composition.
            let (out, wh) = (split(&ours.detach())?, split(&w)?);
            let (gq, gk, gv) = super::composed_backward(&qh.detach(), &kh.detach(), &vh.detach(), &out, &wh, scale)?;
            for (var, g) in [(&q, gq), (&k, gk), (&v, gv)] {
                let g = g.expect("gradient").transpose(1, 2)?.reshape(var.dims())?;
                let err = max_abs(&g, g2.get(var).expect("gradient"))?;
                assert!(err < 1e-5, "fallback n {n} m {m} d {d}: {err}");
            }
        }
        Ok(())
    }
}
