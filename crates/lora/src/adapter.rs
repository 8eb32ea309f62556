//! The run-time form of a LoRA module, attached to a layer through the diffusion crate's
//! [`Adapter`] extension point: `y = W x + scale · up(down(x))`, with
//! `scale = multiplier · alpha / rank`. Trainable when `down` / `up` are `Var`s; the branch may be
//! kept in f32 on an f16/bf16 model (mixed precision).

use candle_core::{Result, Tensor};
use candle_nn::Conv2dConfig;
use easyphoto_diffusion::{Adapter, LowRank};

/// A LoRA branch on a Linear (`down [r, in]`, `up [out, r]`) or a Conv2d (`down [r, in, kh, kw]`
/// with the layer's stride and padding, `up [out, r, 1, 1]`).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    down: Tensor,
    up: Tensor,
    scale: f64,
    conv: Option<Conv2dConfig>,
}

impl LoraAdapter {
    /// A branch on a Linear layer.
    pub fn linear(down: Tensor, up: Tensor, scale: f64) -> Self {
        Self { down, up, scale, conv: None }
    }

    /// A branch on a Conv2d layer with configuration `config` (its stride, padding, dilation).
    pub fn conv(down: Tensor, up: Tensor, scale: f64, config: Conv2dConfig) -> Self {
        Self { down, up, scale, conv: Some(config) }
    }

    /// `multiplier · alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

impl Adapter for LoraAdapter {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Mixed precision: an f16/bf16 frozen layer with f32 LoRA weights computes the branch in
        // the LoRA's dtype and returns it in the layer's.
        let (dtype, x) = (x.dtype(), &x.to_dtype(self.down.dtype())?);
        let h = match &self.conv {
            None => x.broadcast_matmul(&self.down.t()?)?.broadcast_matmul(&self.up.t()?)?,
            Some(c) => x.conv2d(&self.down, c.padding, c.stride, c.dilation, c.groups)?.conv2d(&self.up, 0, 1, 1, 1)?,
        };
        h.affine(self.scale, 0.0)?.to_dtype(dtype)
    }

    fn low_rank(&self) -> Option<LowRank> {
        let (down, up) = match &self.conv {
            None => (self.down.clone(), self.up.clone()),
            // A 1×1 convolution is a linear map of the channels.
            Some(c) if c.stride == 1 && c.padding == 0 && c.groups == 1 && matches!(self.down.dims(), [_, _, 1, 1]) => {
                let (r, inp, out) = (self.down.dim(0).ok()?, self.down.dim(1).ok()?, self.up.dim(0).ok()?);
                (self.down.reshape((r, inp)).ok()?, self.up.reshape((out, r)).ok()?)
            }
            Some(_) => return None,
        };
        Some(LowRank { down, up, scale: self.scale })
    }
}
