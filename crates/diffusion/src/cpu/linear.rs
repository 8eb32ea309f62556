//! `y = x Wᵀ + b` as one matrix product over all rows, split into row bands across threads.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{SendPtr, f32_data, gemm::sgemm, inference, threads};

/// `x Wᵀ + b` for `x` `[…, in]`, `weight` `[out, in]`, `bias` `[out]`, through the kernel; `None`
/// where it does not apply (tracked gradients, not f32, not on the CPU).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let mut args = vec![x, weight];
    args.extend(bias);
    if !inference(&args) || args.iter().any(|t| t.dtype() != DType::F32) || x.rank() < 2 || weight.rank() != 2 {
        return Ok(None);
    }
    let (out, inp) = weight.dims2()?;
    if x.dim(candle_core::D::Minus1)? != inp {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) if b.dims() == [out] => b.contiguous()?,
        Some(_) => return Ok(None),
        None => Tensor::zeros(out, DType::F32, x.device())?,
    };
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias, &LinearOp)?))
}

/// The kernel as a candle op on contiguous f32 `(x [.., in], weight [out, in], bias [out])`.
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
        let (x, w, b) = (f32_data(xs, xl)?, f32_data(ws, wl)?, f32_data(bs, bl)?);
        let rows = x.len() / inp.max(1);
        let mut y = vec![0f32; rows * out];
        // Row bands: enough for every thread, at most 1024 rows (gemm packs the weight per band).
        let band = (rows / (4 * threads())).clamp(32, 1024).next_multiple_of(16).min(rows.max(1));
        let bands = rows.div_ceil(band);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..bands).into_par_iter().for_each(|i| {
            let (r0, r1) = (i * band, ((i + 1) * band).min(rows));
            let y_ptr = y_ptr;
            // SAFETY: each band writes only its own rows r0..r1.
            let dst = unsafe { y_ptr.0.add(r0 * out) };
            for r in 0..r1 - r0 {
                unsafe { std::slice::from_raw_parts_mut(dst.add(r * out), out).copy_from_slice(b) };
            }
            unsafe { sgemm((r1 - r0, out, inp), dst, out, true, (x[r0 * inp..].as_ptr(), inp, 1), (w.as_ptr(), 1, inp), 1) };
        });
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().unwrap() = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}
