//! LoRA merge math, as kohya-ss sd-scripts `LoRAInfModule.merge_to` and peft `merge()` do it:
//! `W' = W + multiplier * (alpha / rank) * up · down`, the product taken over the rank.
//!
//! Linear: `down [r, in]`, `up [out, r]`. Conv2d: `down [r, in, kh, kw]`, `up [out, r, 1, 1]`,
//! giving `ΔW[o, i, y, x] = Σ_r up[o, r] · down[r, i, y, x]` (for 1x1 kernels this is kohya's
//! squeezed matmul, for larger ones its `conv2d(down.permute(1, 0, 2, 3), up)`).

use candle_core::{DType, Tensor};

use crate::LoraError;

/// `alpha / rank`, where a missing or zero alpha means `alpha = rank` (scale 1), as in kohya.
/// A rank of 0 (an empty LoRA) gives 0.
pub fn lora_scale(alpha: Option<f32>, rank: usize) -> f64 {
    match alpha {
        _ if rank == 0 => 0.0,
        Some(alpha) if alpha != 0.0 => f64::from(alpha) / rank as f64,
        _ => 1.0,
    }
}

/// The rank and output channels of a Linear (`[r, in]`, `[out, r]`) or Conv2d
/// (`[r, in, kh, kw]`, `[out, r, 1, 1]`) LoRA pair, or `None` if the shapes are neither.
pub(crate) fn pair_layout(down: &[usize], up: &[usize]) -> Option<(usize, usize)> {
    match (down, up) {
        ([rank, _], [out, up_rank]) | ([rank, _, _, _], [out, up_rank, 1, 1]) if rank == up_rank && *rank > 0 => {
            Some((*rank, *out))
        }
        _ => None,
    }
}

/// `multiplier * lora_scale(alpha, rank) * up · down`, in f32, shaped like the adapted weight
/// (`[out, in]` or `[out, in, kh, kw]`).
pub fn delta_weight(down: &Tensor, up: &Tensor, alpha: Option<f32>, multiplier: f64) -> Result<Tensor, LoraError> {
    let rank = down.dims().first().copied().unwrap_or(0);
    scaled_product(down, up, multiplier * lora_scale(alpha, rank))
}

/// `scale * up · down`, in f32, shaped like the adapted weight.
pub fn scaled_product(down: &Tensor, up: &Tensor, scale: f64) -> Result<Tensor, LoraError> {
    let (rank, out) = pair_layout(down.dims(), up.dims())
        .ok_or_else(|| LoraError::Layout { down: down.dims().to_vec(), up: up.dims().to_vec() })?;
    let mut shape = vec![out];
    shape.extend_from_slice(&down.dims()[1..]);
    let up = up.to_dtype(DType::F32)?.reshape((out, rank))?;
    let down = down.to_dtype(DType::F32)?.reshape((rank, ()))?;
    let delta = up.matmul(&down)?.reshape(shape)?;
    Ok(delta.affine(scale, 0.0)?)
}

/// `weight + delta_weight(down, up, alpha, multiplier)`, summed in f32 and returned in the dtype
/// of `weight`.
pub fn merge_weight(
    weight: &Tensor,
    down: &Tensor,
    up: &Tensor,
    alpha: Option<f32>,
    multiplier: f64,
) -> Result<Tensor, LoraError> {
    let delta = delta_weight(down, up, alpha, multiplier)?;
    if delta.dims() != weight.dims() {
        return Err(LoraError::WeightShape { weight: weight.dims().to_vec(), delta: delta.dims().to_vec() });
    }
    Ok((weight.to_dtype(DType::F32)? + delta)?.to_dtype(weight.dtype())?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn scale_treats_missing_and_zero_alpha_as_rank() {
        assert_eq!(lora_scale(None, 4), 1.0);
        assert_eq!(lora_scale(Some(0.0), 4), 1.0);
        assert_eq!(lora_scale(Some(2.0), 4), 0.5);
        assert_eq!(lora_scale(Some(8.0), 4), 2.0);
        assert_eq!(lora_scale(Some(8.0), 0), 0.0);
    }

    #[test]
    fn conv_delta_sums_over_rank() -> Result<(), LoraError> {
        let dev = Device::Cpu;
        // rank 2, in 1, 2x1 kernel; out 1.
        let down = Tensor::new(&[1f32, 2., 3., 4.], &dev)?.reshape((2, 1, 2, 1))?;
        let up = Tensor::new(&[10f32, 100.], &dev)?.reshape((1, 2, 1, 1))?;
        let delta = delta_weight(&down, &up, Some(1.0), 2.0)?;
        assert_eq!(delta.dims(), &[1, 1, 2, 1]);
        // 2 * (1/2) * (10 * [1, 2] + 100 * [3, 4])
        assert_eq!(delta.flatten_all()?.to_vec1::<f32>()?, [310., 420.]);
        Ok(())
    }

    #[test]
    fn mismatched_pairs_are_rejected() -> Result<(), LoraError> {
        let dev = Device::Cpu;
        let down = Tensor::zeros((4, 8, 3, 3), DType::F32, &dev)?;
        let up_3x3 = Tensor::zeros((12, 4, 3, 3), DType::F32, &dev)?;
        assert!(matches!(delta_weight(&down, &up_3x3, None, 1.0), Err(LoraError::Layout { .. })));
        let up = Tensor::zeros((12, 4, 1, 1), DType::F32, &dev)?;
        let weight = Tensor::zeros((12, 8, 1, 1), DType::F32, &dev)?;
        assert!(matches!(
            merge_weight(&weight, &down, &up, None, 1.0),
            Err(LoraError::WeightShape { weight, delta })
                if weight == [12, 8, 1, 1] && delta == [12, 8, 3, 3]
        ));
        Ok(())
    }
}
