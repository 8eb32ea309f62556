//! GEGLU: `h[…, :I] · gelu(h[…, I:])` of the `2I`-wide projection, in one pass (candle's
//! composition makes two strided views, a gelu tensor and a product tensor).

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{gelu_erf, multiversion};
use super::{f32_data, inference, profile};

/// GEGLU of `h` `[…, 2I]` to `[…, I]`, with the exact (erf) gelu.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let _p = profile::scope("geglu");
    let half = h.dim(D::Minus1)? / 2;
    if inference(&[h]) && h.dtype() == DType::F32 && h.dim(D::Minus1)? % 2 == 0 {
        return h.contiguous()?.apply_op1_no_bwd(&GegluOp);
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
        let mut out = vec![0f32; h.len() / 2];
        if half > 0 {
            // About 64 KiB of output per task.
            let rows = (16384 / half).max(1);
            out.par_chunks_mut(rows * half).zip(h.par_chunks(rows * 2 * half)).for_each(|(dst, src)| {
                for (d, s) in dst.chunks_exact_mut(half).zip(src.chunks_exact(2 * half)) {
                    row(d, s);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

multiversion! {
    fn row(dst: &mut [f32], src: &[f32]) {
        let (x, gate) = src.split_at(dst.len());
        for ((d, &x), &g) in dst.iter_mut().zip(x).zip(gate) {
            *d = x * gelu_erf(g);
        }
    }
}
