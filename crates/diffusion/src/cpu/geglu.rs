//! GEGLU: `h[…, :I] · gelu(h[…, I:])` of the `2I`-wide projection, in one pass (candle's
//! composition makes two strided views, a gelu tensor and a product tensor), with its own
//! backward for training (candle's erf-gelu backward is a chain of single-threaded ops).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{erf, exp, gelu_erf, multiversion};
use super::{f32_data, inference, on_cpu, profile};
use rayon::iter::{IntoParallelIterator, ParallelIterator};

/// GEGLU of `h` `[…, 2I]` to `[…, I]`, with the exact (erf) gelu.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let _p = profile::scope("geglu");
    let half = h.dim(D::Minus1)? / 2;
    if on_cpu(&[h]) && h.dtype() == DType::F32 && h.dim(D::Minus1)? % 2 == 0 {
        let h = h.contiguous()?;
        return if inference(&[&h]) { h.apply_op1_no_bwd(&GegluOp) } else { h.apply_op1(GegluOp) };
    }
    let (x, gate) = (h.narrow(D::Minus1, 0, half)?, h.narrow(D::Minus1, half, half)?);
    x * gate.gelu_erf()?
}

/// The kernel as a candle op on a contiguous f32 `[…, 2I]` tensor.
#[derive(Debug, Clone, Copy)]
pub struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "easyphoto-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        let Some(last) = dims.last_mut() else { candle_core::bail!("geglu: scalar input") };
        if *last % 2 != 0 {
            candle_core::bail!("geglu: odd last dimension {}", *last)
        }
        *last /= 2;
        let half = *last;
        let h = f32_data(s, l)?;
        let len = h.len() / 2;
        let mut out = Vec::with_capacity(len);
        // About 64 KiB of output per task.
        if let Some(rows) = 16384usize.checked_div(half) {
            let rows = rows.max(1);
            out.spare_capacity_mut()[..len].par_chunks_mut(rows * half).zip(h.par_chunks(rows * 2 * half)).for_each(
                |(dst, src)| {
                    for (d, s) in dst.chunks_exact_mut(half).zip(src.chunks_exact(2 * half)) {
                        row(d, s);
                    }
                },
            );
        }
        // SAFETY: every output row was written from its input row (`h` holds `len / half` rows
        // of `2 · half` values); with `half == 0` the output is empty.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _p = profile::scope("geglu backward");
        Ok(Some(h.apply_op2_no_bwd(&grad.detach().contiguous()?, &GegluBackward)?))
    }
}

/// The gradient of [`GegluOp`] with respect to its input `h` `[…, 2I]`, from `h` and the
/// output gradient `[…, I]`: `[g · gelu(gate), g · x · gelu'(gate)]`.
struct GegluBackward;

impl candle_core::CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "easyphoto-geglu-backward"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, g) = (f32_data(hs, hl)?, f32_data(gs, gl)?);
        let half = gl.dims().last().copied().unwrap_or(0);
        if h.len() != 2 * g.len() {
            candle_core::bail!("geglu backward: input {:?} against gradient {:?}", hl.dims(), gl.dims())
        }
        let mut out = Vec::with_capacity(h.len());
        if let Some(rows) = 16384usize.checked_div(half) {
            let rows = rows.max(1);
            out.spare_capacity_mut()[..h.len()]
                .par_chunks_mut(rows * 2 * half)
                .zip(h.par_chunks(rows * 2 * half).zip(g.par_chunks(rows * half)))
                .for_each(|(dst, (src, grad))| {
                    for ((d, s), g) in
                        dst.chunks_exact_mut(2 * half).zip(src.chunks_exact(2 * half)).zip(grad.chunks_exact(half))
                    {
                        row_backward(d, s, g);
                    }
                });
        }
        // SAFETY: every row of the gradient was written.
        unsafe { out.set_len(h.len()) };
        Ok((CpuStorage::F32(out), hl.shape().clone()))
    }
}

multiversion! {
    /// One row of [`GegluBackward`]: `dst` and `src` are `[x | gate]`, `grad` the output's.
    fn row_backward(dst: &mut [MaybeUninit<f32>], src: &[f32], grad: &[f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let (x, gate) = src.split_at(grad.len());
        let (dx, dgate) = dst.split_at_mut(grad.len());
        for ((((dx, dg), &x), &t), &g) in dx.iter_mut().zip(dgate).zip(x).zip(gate).zip(grad) {
            let cdf = 0.5 * (1.0 + erf(t * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = exp(-0.5 * t * t) * INV_SQRT_2PI;
            dx.write(g * t * cdf);
            dg.write(g * x * (cdf + t * pdf));
        }
    }
}

multiversion! {
    fn row(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
        let (x, gate) = src.split_at(dst.len());
        for ((d, &x), &g) in dst.iter_mut().zip(x).zip(gate) {
            d.write(x * gelu_erf(g));
        }
    }
}

/// `geglu(x Wᵀ + b)` for `x` `[…, C]`, `weight` `[2I, C]`, `bias` `[2I]` in one kernel: row
/// bands × column chunks, each computing its value and gate columns into a cache-sized buffer
/// and writing only the `[…, I]` result (the `[…, 2I]` projection is never stored). `None`
/// where it does not apply (tracked gradients, not f32, not on the CPU).
pub fn linear_geglu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let mut args = vec![x, weight];
    args.extend(bias);
    if !inference(&args) || !super::gemm_dtypes(x, weight) || x.rank() < 2 || weight.rank() != 2 {
        return Ok(None);
    }
    let (out2, inp) = weight.dims2()?;
    if x.dim(D::Minus1)? != inp || out2 % 2 != 0 {
        return Ok(None);
    }
    let _p = profile::scope_flops("linear+geglu", 2.0 * (x.elem_count() * out2) as f64);
    let bias = match bias {
        Some(b) if b.dims() == [out2] => b.to_dtype(DType::F32)?.contiguous()?,
        Some(_) => return Ok(None),
        None => Tensor::zeros(out2, DType::F32, x.device())?,
    };
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias, &LinearGegluOp)?;
    Ok(Some(y.to_dtype(x.dtype())?))
}

/// [`linear_geglu`] as a candle op on contiguous `(x, weight, bias)`: `x` and `bias` f32, the
/// weight f32, f16 or bf16 (each task converts the weight rows it uses).
#[derive(Debug, Clone, Copy)]
pub struct LinearGegluOp;

/// Rows per band and value columns per chunk (tall, narrow products suit `gemm` best here).
const ROWS: usize = 1024;
const COLS: usize = 64;

thread_local! {
    static BUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static WBUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl candle_core::CustomOp3 for LinearGegluOp {
    fn name(&self) -> &'static str {
        "easyphoto-linear-geglu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out2, inp) = wl.shape().dims2()?;
        let half = out2 / 2;
        let (x, w, b) = (f32_data(xs, xl)?, super::Weights::of(ws, wl)?, f32_data(bs, bl)?);
        let rows = x.len() / inp.max(1);
        let mut y = Vec::<f32>::with_capacity(rows * half);
        let (rr, cc) = (ROWS, COLS);
        let (bands, chunks) = (rows.div_ceil(rr), half.div_ceil(cc));
        let y_ptr = super::SendPtr(y.as_mut_ptr());
        (0..bands * chunks).into_par_iter().for_each(|task| {
            let (band, chunk) = (task / chunks, task % chunks);
            let (r0, r1) = (band * rr, ((band + 1) * rr).min(rows));
            let (j0, j1) = (chunk * cc, ((chunk + 1) * cc).min(half));
            let (nr, nj) = (r1 - r0, j1 - j0);
            BUF.with_borrow_mut(|buf| {
                buf.resize(nr * 2 * nj, 0.0);
                let xa = (x[r0 * inp..].as_ptr(), inp, 1);
                for (part, w0) in [(0, j0), (nj, half + j0)] {
                    WBUF.with_borrow_mut(|wbuf| {
                        let wb = (w.slice(w0 * inp, nj * inp, wbuf).as_ptr(), 1, inp);
                        // SAFETY: the slices hold the addressed matrices; buf is this thread's.
                        unsafe {
                            super::gemm::sgemm((nr, nj, inp), buf[part..].as_mut_ptr(), 2 * nj, false, xa, wb, 1)
                        };
                    });
                }
                for (r, h) in buf.chunks_exact(2 * nj).enumerate() {
                    // SAFETY: row r0 + r, columns j0..j1 of the output belong to this task.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add((r0 + r) * half + j0).cast(), nj) };
                    row_biased(dst, h, &b[j0..j1], &b[half + j0..half + j1]);
                }
            });
        });
        // SAFETY: the tasks cover every row and column of y.
        unsafe { y.set_len(rows * half) };
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap_or(&mut 0) = half;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

multiversion! {
    /// `dst = (h[..n] + bv) · gelu(h[n..] + bg)`.
    fn row_biased(dst: &mut [MaybeUninit<f32>], h: &[f32], bv: &[f32], bg: &[f32]) {
        let (x, gate) = h.split_at(dst.len());
        for ((((d, &x), &g), &bv), &bg) in dst.iter_mut().zip(x).zip(gate).zip(bv).zip(bg) {
            d.write((x + bv) * gelu_erf(g + bg));
        }
    }
}
