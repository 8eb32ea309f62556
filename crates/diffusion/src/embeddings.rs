//! Sinusoidal timestep features and the MLP that embeds them (diffusers `embeddings.py`).

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{Activation, LayerMut, Linear, VisitLayers};

/// diffusers `get_timestep_embedding`: `timesteps` `[N]` (any float dtype) to `[N, dim]` f32.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    // Same f32 operation order as diffusers: (-ln(10000) * i) / (half - shift), a true division.
    let exponent = (Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)? * -(10000f64.ln()))?;
    let divisor = Tensor::new(half as f32 - downscale_freq_shift as f32, device)?;
    let freqs = exponent.broadcast_div(&divisor)?.exp()?;
    let args = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], D::Minus1)? } else { Tensor::cat(&[sin, cos], D::Minus1)? };
    if dim % 2 == 1 { emb.pad_with_zeros(D::Minus1, 0, 1) } else { Ok(emb) }
}

/// diffusers `TimestepEmbedding`: `linear_1`, activation, `linear_2`, optional post-activation,
/// and the optional `cond_proj` (LCM-distilled UNets feed the guidance embedding through it).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    cond_proj: Option<Linear>,
    act: Activation,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
        cond_proj_dim: Option<usize>,
    ) -> Result<Self> {
        let cond_proj = match cond_proj_dim {
            Some(dim) => Some(Linear::new(vb.pp("cond_proj"), dim, in_channels, false)?),
            None => None,
        };
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_channels, time_embed_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim, true)?,
            cond_proj,
            act,
            post_act,
        })
    }

    pub fn forward(&self, sample: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let sample = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => (sample + proj.forward(c)?)?,
            _ => sample.clone(),
        };
        let x = self.linear_2.forward(&self.act.forward(&self.linear_1.forward(&sample)?)?)?;
        match self.post_act {
            Some(act) => act.forward(&x),
            None => Ok(x),
        }
    }
}

impl VisitLayers for TimestepEmbedding {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.linear_1.visit_layers(f);
        self.linear_2.visit_layers(f);
        self.cond_proj.visit_layers(f);
    }
}
