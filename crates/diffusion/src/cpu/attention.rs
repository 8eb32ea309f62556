//! Scaled dot-product attention without the `[N, M]` score matrix: a FlashAttention-style
//! kernel (online softmax over blocks of keys) with AVX-512 micro-kernels.
//!
//! Work is split into tasks of [`BR`] queries of one (batch, head), run in parallel on rayon's
//! pool. A task keeps its queries (pre-scaled by `scale · log2 e`, so the softmax uses `2^x`),
//! a running max and sum per query, and an f32 output accumulator; for each block of [`BC`] keys
//! it computes the `BR × BC` scores (8 queries × 32 keys per register tile, keys packed
//! transposed in 32-key panels), turns them into probabilities, rescales the accumulator when
//! the running max grows, and adds `P · V` (4 queries × up to 64 output channels per tile).
//! Memory: the packed keys plus `BR·(d + BC)` floats per thread, instead of `B·H·N·M` scores.
//!
//! The output is returned as a `[B, H, N, d]` view of a contiguous `[B, N, H, d]` tensor, so
//! that merging the heads afterwards is free.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{inference, simd::has_avx512};

/// Queries per task.
pub const BR: usize = 64;
/// Keys per block.
pub const BC: usize = 128;

/// `softmax(q·kᵀ·scale)·v` for `q` `[B, H, N, d]` and `k`, `v` `[B, H, M, d]`, all f32, or
/// `None` where the kernel does not apply (gradients tracked, not f32, not on the CPU, no
/// AVX-512): the caller then uses the plain composition.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !inference(&[q, k, v]) || !has_avx512() || [q.dtype(), k.dtype(), v.dtype()] != [DType::F32; 3] {
        return Ok(None);
    }
    let (Ok((b, h, _, d)), Ok((kb, kh, m, kd))) = (q.dims4(), k.dims4()) else { return Ok(None) };
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() || m == 0 || d == 0 {
        return Ok(None);
    }
    let op = AttentionOp { scale: scale as f32 };
    // [B, N, H, d] memory, seen as [B, H, N, d].
    Ok(Some(q.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2)?))
}

/// The kernel as a candle op on `(q [B, H, N, d], k [B, H, M, d], v [B, H, M, d])` with unit
/// stride in `d`; the result is `[B, N, H, d]`, contiguous.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOp {
    pub scale: f32,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "easyphoto-attention"
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
        self.forward((qs, ql), (ks, kl), (vs, vl), None)
    }
}

impl AttentionOp {
    /// The kernel on `(storage, layout)` views; with `lse` (`B·H·N` values) it also writes each
    /// query's base-2 log-sum-exp of its scaled scores (`log2 Σ_j 2^(scale · log2 e · q·k_j)`),
    /// which the training backward reuses.
    pub(super) fn forward(
        &self,
        (qs, ql): (&CpuStorage, &Layout),
        (ks, kl): (&CpuStorage, &Layout),
        (vs, vl): (&CpuStorage, &Layout),
        lse: Option<&mut [f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, n, d) = ql.shape().dims4()?;
        let (_, _, m, _) = kl.shape().dims4()?;
        if !has_avx512() {
            candle_core::bail!("easyphoto-attention needs AVX-512")
        }
        if lse.as_ref().is_some_and(|l| l.len() != b * h * n) {
            candle_core::bail!("attention: log-sum-exp buffer of the wrong size")
        }
        let view = |s: &'_ CpuStorage, l: &Layout| -> Result<Strided> {
            let st = l.stride();
            if st[3] != 1 && l.dims()[3] > 1 {
                candle_core::bail!("attention: the head dimension must have unit stride, got {st:?}")
            }
            Ok(Strided { ptr: s.as_slice::<f32>()?[l.start_offset()..].as_ptr(), s: [st[0], st[1], st[2]] })
        };
        let (q, k, v) = (view(qs, ql)?, view(ks, kl)?, view(vs, vl)?);
        let mut out = vec![0f32; b * n * h * d];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 is present (checked above) and the views address their tensors.
        unsafe {
            x86::attention(&q, &k, &v, (b, h, n, m, d), self.scale, &mut out, lse)
        };
        Ok((CpuStorage::F32(out), Shape::from((b, n, h, d))))
    }
}

/// A `[B, H, rows, d]` tensor: its data pointer and the strides of the first three dimensions.
#[derive(Clone, Copy)]
struct Strided {
    ptr: *const f32,
    s: [usize; 3],
}
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

impl Strided {
    fn row(&self, b: usize, h: usize, i: usize) -> *const f32 {
        self.ptr.wrapping_add(b * self.s[0] + h * self.s[1] + i * self.s[2])
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles index several arrays by row and vector
pub(super) mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use rayon::prelude::*;

    use super::{BC, BR, Strided};
    use crate::cpu::SendPtr;

    /// Rows per score tile.
    const RS: usize = 8;

    /// Vectors of `d` per `P·V` chunk and rows per tile for `left` vectors still to do: about
    /// 24 accumulators, and as many rows as possible so that each loaded `V` vector feeds more
    /// FMAs (large `d` is otherwise bound by L2 bandwidth).
    fn pv_shape(left: usize) -> (usize, usize) {
        match left {
            5 => (5, 4),
            4 => (4, 6),
            n if n >= 3 => (3, 8),
            n => (n, 8),
        }
    }

    macro_rules! pv_dispatch {
        ($r:expr, $nv:expr, $args:expr; $($nvv:literal: $($rr:literal)*);*) => {
            match ($nv, $r) {
                $($(($nvv, $rr) => pv_tile::<$rr, $nvv>($args),)*)*
                _ => unreachable!("no P·V tile for {} rows × {} vectors", $r, $nv),
            }
        };
    }
    /// Keys per packed panel.
    const PANEL: usize = 32;

    struct Buffers {
        q: Vec<f32>,
        o: Vec<f32>,
        s: Vec<f32>,
    }

    thread_local! {
        static BUFFERS: RefCell<Buffers> = const { RefCell::new(Buffers { q: Vec::new(), o: Vec::new(), s: Vec::new() }) };
    }

    /// # Safety
    /// AVX-512F must be available; the views must address `[B, H, N|M, d]` f32 tensors.
    pub(super) unsafe fn attention(
        q: &Strided,
        k: &Strided,
        v: &Strided,
        (b, h, n, m, d): (usize, usize, usize, usize, usize),
        scale: f32,
        out: &mut [f32],
        lse: Option<&mut [f32]>,
    ) {
        // Keys, transposed into panels of 32: kp[bh][panel][c][32], zero-padded past M.
        let panels = m.div_ceil(PANEL);
        let per_bh = panels * d * PANEL;
        let mut kp = vec![0f32; b * h * per_bh];
        kp.par_chunks_mut(per_bh).enumerate().for_each(|(bh, dst)| {
            for j in 0..m {
                let row = unsafe { std::slice::from_raw_parts(k.row(bh / h, bh % h, j), d) };
                let (p, jj) = (j / PANEL, j % PANEL);
                for (c, &x) in row.iter().enumerate() {
                    dst[(p * d + c) * PANEL + jj] = x;
                }
            }
        });
        let blocks = n.div_ceil(BR);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let lse_ptr = lse.map(|l| SendPtr(l.as_mut_ptr()));
        let scale2 = scale * std::f32::consts::LOG2_E;
        (0..b * h * blocks).into_par_iter().for_each(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (q0, rows) = (blk * BR, BR.min(n - blk * BR));
            BUFFERS.with_borrow_mut(|bufs| unsafe {
                query_block(
                    q,
                    &kp[bh * per_bh..][..per_bh],
                    v,
                    (bh / h, bh % h),
                    (q0, rows),
                    (n, h, m, d),
                    scale2,
                    (out_ptr.get(), lse_ptr.map(|p| p.get())),
                    bufs,
                )
            });
        });
    }

    /// One task: queries `q0..q0 + rows` of head `(bi, hi)` against all keys.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn query_block(
        q: &Strided,
        kp: &[f32],
        v: &Strided,
        (bi, hi): (usize, usize),
        (q0, rows): (usize, usize),
        (n, h, m, d): (usize, usize, usize, usize),
        scale2: f32,
        (out, lse): (*mut f32, Option<*mut f32>),
        bufs: &mut Buffers,
    ) {
        let dp = d.next_multiple_of(16);
        for (buf, len) in [(&mut bufs.q, BR * d), (&mut bufs.o, BR * dp), (&mut bufs.s, BR * BC)] {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
        }
        let (qs, o, s) = (bufs.q.as_mut_ptr(), bufs.o.as_mut_ptr(), bufs.s.as_mut_ptr());
        for i in 0..rows {
            let src = unsafe { std::slice::from_raw_parts(q.row(bi, hi, q0 + i), d) };
            for (c, &x) in src.iter().enumerate() {
                unsafe { *qs.add(i * d + c) = x * scale2 };
            }
        }
        unsafe { std::ptr::write_bytes(o, 0, BR * dp) };
        let mut mx = [f32::NEG_INFINITY; BR];
        let mut sum = [0f32; BR];
        let mut alpha = [0f32; BR];
        let nvec = dp / 16;
        let tail = if d % 16 == 0 { 0xffff } else { (1u32 << (d % 16)) as u16 - 1 };
        for j0 in (0..m).step_by(BC) {
            let bc = BC.min(m - j0);
            // Scores: s[i][jj] for jj < round_up(bc, 32).
            for p in 0..bc.div_ceil(PANEL) {
                let panel = unsafe { kp.as_ptr().add((j0 / PANEL + p) * d * PANEL) };
                let mut i = 0;
                while i < rows {
                    let r = RS.min(rows - i);
                    let (qi, si) = unsafe { (qs.add(i * d), s.add(i * BC + p * PANEL)) };
                    unsafe {
                        match r {
                            8 => score_tile::<8>(qi, d, panel, si),
                            7 => score_tile::<7>(qi, d, panel, si),
                            6 => score_tile::<6>(qi, d, panel, si),
                            5 => score_tile::<5>(qi, d, panel, si),
                            4 => score_tile::<4>(qi, d, panel, si),
                            3 => score_tile::<3>(qi, d, panel, si),
                            2 => score_tile::<2>(qi, d, panel, si),
                            _ => score_tile::<1>(qi, d, panel, si),
                        }
                    }
                    i += r;
                }
            }
            // Online softmax: block maxima row by row, the running max and rescale factors for
            // all rows at once (off the rows' dependency chains), then the exponentials.
            let mut m_blk = [f32::NEG_INFINITY; BR];
            for (i, m) in m_blk.iter_mut().enumerate().take(rows) {
                *m = unsafe { row_max(s.add(i * BC), bc) };
            }
            for i in 0..BR {
                let m_new = mx[i].max(m_blk[i]);
                m_blk[i] = m_new;
                // 2^(m_old - m_new): 0 on the first block (m_old = -inf).
                alpha[i] =
                    if mx[i] == m_new { 1.0 } else { unsafe { _mm512_cvtss_f32(exp2(_mm512_set1_ps(mx[i] - m_new))) } };
                mx[i] = m_new;
            }
            for i in 0..rows {
                let add = unsafe { exp_row(s.add(i * BC), bc, mx[i]) };
                sum[i] = sum[i] * alpha[i] + add;
            }
            // o = o · alpha + P · V[j0..j0 + bc].
            let vb = v.row(bi, hi, j0);
            let vs = v.s[2];
            let mut c = 0;
            while c < nvec {
                let (nv, rp) = pv_shape(nvec - c);
                let mask = if c + nv == nvec { tail } else { 0xffff };
                let mut i = 0;
                while i < rows {
                    let r = rp.min(rows - i);
                    let args: PvArgs = unsafe {
                        (s.add(i * BC), vb.add(c * 16), vs, bc, o.add(i * dp + c * 16), dp, alpha.as_ptr().add(i), mask)
                    };
                    unsafe {
                        pv_dispatch!(r, nv, args;
                            1: 1 2 3 4 5 6 7 8;
                            2: 1 2 3 4 5 6 7 8;
                            3: 1 2 3 4 5 6 7 8;
                            4: 1 2 3 4 5 6;
                            5: 1 2 3 4)
                    }
                    i += r;
                }
                c += nv;
            }
        }
        // out[bi, q0 + i, hi, :] = o[i] / sum[i]
        for (i, &total) in sum.iter().enumerate().take(rows) {
            if let Some(lse) = lse {
                unsafe { *lse.add((bi * h + hi) * n + q0 + i) = mx[i] + total.log2() };
            }
            let inv = 1.0 / total;
            let dst = unsafe { out.add(((bi * n + q0 + i) * h + hi) * d) };
            for c in 0..d {
                unsafe { *dst.add(c) = *o.add(i * dp + c) * inv };
            }
        }
    }

    /// `s[r][0..32] = qs[r] · panel` for `R` rows (`qs` row stride `d`, `s` row stride `BC`).
    ///
    /// # Safety
    /// AVX-512F; the pointers address `R` rows of `d` queries, `d × 32` keys and `R` score rows.
    #[inline(always)]
    unsafe fn score_tile<const R: usize>(qs: *const f32, d: usize, panel: *const f32, s: *mut f32) {
        unsafe {
            let mut a0 = [_mm512_setzero_ps(); R];
            let mut a1 = [_mm512_setzero_ps(); R];
            for c in 0..d {
                let k0 = _mm512_loadu_ps(panel.add(c * PANEL));
                let k1 = _mm512_loadu_ps(panel.add(c * PANEL + 16));
                for r in 0..R {
                    let qb = _mm512_set1_ps(*qs.add(r * d + c));
                    a0[r] = _mm512_fmadd_ps(qb, k0, a0[r]);
                    a1[r] = _mm512_fmadd_ps(qb, k1, a1[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(s.add(r * BC), a0[r]);
                _mm512_storeu_ps(s.add(r * BC + 16), a1[r]);
            }
        }
    }

    /// The largest of one row's `bc` scores.
    ///
    /// # Safety
    /// AVX-512F; `row` addresses `bc` values.
    #[inline(always)]
    pub(in crate::cpu) unsafe fn row_max(row: *const f32, bc: usize) -> f32 {
        unsafe {
            let (full, rem) = (bc / 16, bc % 16);
            let (mut m0, mut m1) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
            let mut t = 0;
            while t + 1 < full {
                m0 = _mm512_max_ps(m0, _mm512_loadu_ps(row.add(t * 16)));
                m1 = _mm512_max_ps(m1, _mm512_loadu_ps(row.add(t * 16 + 16)));
                t += 2;
            }
            if t < full {
                m0 = _mm512_max_ps(m0, _mm512_loadu_ps(row.add(t * 16)));
            }
            if rem > 0 {
                let tail: __mmask16 = ((1u32 << rem) - 1) as u16;
                m1 = _mm512_max_ps(
                    m1,
                    _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, row.add(full * 16)),
                );
            }
            _mm512_reduce_max_ps(_mm512_max_ps(m0, m1))
        }
    }

    /// Replaces one row's `bc` scores (log2 domain) by `2^(s - m)` and returns their sum.
    ///
    /// # Safety
    /// AVX-512F; `row` addresses `bc` values.
    #[inline(always)]
    pub(in crate::cpu) unsafe fn exp_row(row: *mut f32, bc: usize, m: f32) -> f32 {
        unsafe {
            let (full, rem) = (bc / 16, bc % 16);
            let mv = _mm512_set1_ps(m);
            let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut t = 0;
            while t + 1 < full {
                let p0 = exp2(_mm512_sub_ps(_mm512_loadu_ps(row.add(t * 16)), mv));
                let p1 = exp2(_mm512_sub_ps(_mm512_loadu_ps(row.add(t * 16 + 16)), mv));
                _mm512_storeu_ps(row.add(t * 16), p0);
                _mm512_storeu_ps(row.add(t * 16 + 16), p1);
                s0 = _mm512_add_ps(s0, p0);
                s1 = _mm512_add_ps(s1, p1);
                t += 2;
            }
            if t < full {
                let p = exp2(_mm512_sub_ps(_mm512_loadu_ps(row.add(t * 16)), mv));
                _mm512_storeu_ps(row.add(t * 16), p);
                s0 = _mm512_add_ps(s0, p);
            }
            if rem > 0 {
                let tail: __mmask16 = ((1u32 << rem) - 1) as u16;
                let x = _mm512_maskz_loadu_ps(tail, row.add(full * 16));
                let p = _mm512_maskz_mov_ps(tail, exp2(_mm512_sub_ps(x, mv)));
                _mm512_mask_storeu_ps(row.add(full * 16), tail, p);
                s1 = _mm512_add_ps(s1, p);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
        }
    }

    /// `2^x`, relative error about 1e-7; exactly 0 for `x < -126` (and -inf), so that no
    /// denormal is produced (each costs a slow microcode assist).
    ///
    /// # Safety
    /// AVX-512F.
    #[inline(always)]
    pub(in crate::cpu) unsafe fn exp2(x: __m512) -> __m512 {
        unsafe {
            let normal = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-126.0));
            let x = _mm512_max_ps(x, _mm512_set1_ps(-126.0));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            let f = _mm512_sub_ps(x, n);
            let mut p = _mm512_set1_ps(1.525_273_4e-5);
            for c in [1.540_353e-4, 1.333_355_8e-3, 9.618_129e-3, 5.550_411e-2, 2.402_265e-1, 6.931_472e-1, 1.0] {
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
            }
            _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n))
        }
    }

    /// `(p, v, v row stride, keys, o, o row stride, alpha, mask of v's last vector)`.
    type PvArgs = (*const f32, *const f32, usize, usize, *mut f32, usize, *const f32, __mmask16);

    /// `o[r][..16·NV] = o[r] · alpha[r] + Σ_j p[r][j] · v[j][..16·NV]` for `R` rows; `p` row
    /// stride `BC`.
    ///
    /// # Safety
    /// AVX-512F; the pointers address `R` rows of `p` and `o`, and `bc` rows of `v`.
    #[inline(always)]
    unsafe fn pv_tile<const R: usize, const NV: usize>((p, v, vs, bc, o, dp, alpha, mask): PvArgs) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; R];
            for r in 0..R {
                let a = _mm512_set1_ps(*alpha.add(r));
                for t in 0..NV {
                    acc[r][t] = _mm512_mul_ps(_mm512_loadu_ps(o.add(r * dp + t * 16)), a);
                }
            }
            for j in 0..bc {
                let mut vv = [_mm512_setzero_ps(); NV];
                for t in 0..NV {
                    let m = if t + 1 == NV { mask } else { 0xffff };
                    vv[t] = _mm512_maskz_loadu_ps(m, v.add(j * vs + t * 16));
                }
                for r in 0..R {
                    let pb = _mm512_set1_ps(*p.add(r * BC + j));
                    for t in 0..NV {
                        acc[r][t] = _mm512_fmadd_ps(pb, vv[t], acc[r][t]);
                    }
                }
            }
            for r in 0..R {
                for t in 0..NV {
                    _mm512_storeu_ps(o.add(r * dp + t * 16), acc[r][t]);
                }
            }
        }
    }
}
