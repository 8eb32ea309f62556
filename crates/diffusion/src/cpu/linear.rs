//! `y = x Wᵀ + b` as one matrix product over all rows, split into row bands across threads.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{SendPtr, Weights, f32_data, gemm::sgemm, gemm_dtypes, inference, threads};

/// `x Wᵀ + b` for `x` `[…, in]`, `weight` `[out, in]`, `bias` `[out]`, through the kernel; `None`
/// where it does not apply (tracked gradients, not on the CPU, not f32 / f16 / bf16). Computes
/// in f32 whatever the dtypes of `x` and the weight; the result has `x`'s dtype.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let mut args = vec![x, weight];
    args.extend(bias);
    if !inference(&args) || !gemm_dtypes(x, weight) || x.rank() < 2 || weight.rank() != 2 {
        return Ok(None);
    }
    let (out, inp) = weight.dims2()?;
    if x.dim(candle_core::D::Minus1)? != inp {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) if b.dims() == [out] => b.to_dtype(DType::F32)?.contiguous()?,
        Some(_) => return Ok(None),
        None => Tensor::zeros(out, DType::F32, x.device())?,
    };
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias, &LinearOp)?;
    Ok(Some(y.to_dtype(x.dtype())?))
}

/// Row bands × column chunks for a `rows × out` product on `threads` threads: at least four
/// tasks per thread, bands of at most 1024 rows, and, among those, the split that repacks the
/// least (each task packs its rows of `x` and its columns of `W`).
pub(super) fn grid(rows: usize, out: usize, threads: usize) -> (usize, usize) {
    let target = 4 * threads;
    let min_bands = rows.div_ceil(1024).max(1);
    let mut best = (min_bands.max(target), 1);
    let mut best_cost = usize::MAX;
    let mut rb = 1;
    while rb <= rows.max(1) {
        if rb >= min_bands {
            let cb = target.div_ceil(rb).min(out.div_ceil(16)).max(1);
            let cost = rb * out + cb * rows;
            if rb * cb >= target.min(rows.div_ceil(16) * out.div_ceil(16)) && cost < best_cost {
                (best, best_cost) = ((rb, cb), cost);
            }
        }
        if rb >= target && rb >= min_bands {
            break;
        }
        rb *= 2;
    }
    best
}

thread_local! {
    static WBUF: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The kernel as a candle op on contiguous `(x [.., in], weight [out, in], bias [out])`: `x` and
/// `bias` f32, the weight f32, f16 or bf16 (each task converts the weight rows it uses).
#[derive(Debug, Clone, Copy)]
pub struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "easyphoto-linear"
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
        let (out, inp) = wl.shape().dims2()?;
        let (x, w, b) = (f32_data(xs, xl)?, Weights::of(ws, wl)?, f32_data(bs, bl)?);
        let rows = x.len() / inp.max(1);
        let mut y = Vec::<f32>::with_capacity(rows * out);
        let (rb, cb) = grid(rows, out, threads());
        // Column chunks in multiples of 64: gemm's AVX-512 micro-kernel is 64 wide along them.
        let (band, chunk) = (rows.div_ceil(rb), out.div_ceil(cb).next_multiple_of(64).min(out));
        let cb = out.div_ceil(chunk);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..rb * cb).into_par_iter().for_each(|task| {
            let (r0, c0) = ((task / cb) * band, (task % cb) * chunk);
            let (nr, nc) = (band.min(rows.saturating_sub(r0)), chunk.min(out.saturating_sub(c0)));
            if nr == 0 || nc == 0 {
                return;
            }
            // SAFETY: each task writes only its own rows r0.. and columns c0.. of y.
            let dst = unsafe { y_ptr.get().add(r0 * out + c0) };
            for r in 0..nr {
                unsafe { std::ptr::copy_nonoverlapping(b[c0..c0 + nc].as_ptr(), dst.add(r * out), nc) };
            }
            WBUF.with_borrow_mut(|buf| {
                let (xa, wb) = (x[r0 * inp..].as_ptr(), w.slice(c0 * inp, nc * inp, buf).as_ptr());
                unsafe { sgemm((nr, nc, inp), dst, out, true, (xa, inp, 1), (wb, 1, inp), 1) };
            });
        });
        // SAFETY: the tasks cover every row and column of y, each writing the bias before adding
        // the product to it.
        unsafe { y.set_len(rows * out) };
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}
