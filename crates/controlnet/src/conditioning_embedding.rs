//! The ControlNet hint encoder: diffusers `ControlNetConditioningEmbedding`.
//!
//! `conv_in` (3x3), SiLU, then per pair of consecutive `block_out_channels` a 3x3 conv and a
//! 3x3 stride-2 conv (each followed by SiLU), then `conv_out` (3x3). Every conv pads by 1, so
//! the output is the input downsampled `block_out_channels.len() - 1` times by 2 (rounding up).

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use easyphoto_diffusion::layers::{Conv2d, LayerMut, VisitLayers};

use crate::ControlNetError;
use crate::weights::conv2d;

/// Prefix of the module's weights inside a diffusers ControlNet checkpoint.
pub const DIFFUSERS_PREFIX: &str = "controlnet_cond_embedding";

/// Shape of a [`ControlNetConditioningEmbedding`]; field names follow diffusers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetConditioningEmbeddingConfig {
    /// Channels of the output (the UNet's first block width, 320 for SD 1.5).
    pub conditioning_embedding_channels: usize,
    /// Widths of the hint encoder stages; one stride-2 downsampling between consecutive ones.
    pub block_out_channels: Vec<usize>,
    /// Channels of the conditioning image.
    pub conditioning_channels: usize,
}

impl Default for ControlNetConditioningEmbeddingConfig {
    /// The diffusers defaults used by every SD 1.5 ControlNet: 3 -> (16, 32, 96, 256) -> 320.
    fn default() -> Self {
        Self {
            conditioning_embedding_channels: 320,
            block_out_channels: vec![16, 32, 96, 256],
            conditioning_channels: 3,
        }
    }
}

impl ControlNetConditioningEmbeddingConfig {
    /// Number of convs in `blocks`: two per pair of consecutive `block_out_channels`.
    pub fn num_blocks(&self) -> usize {
        2 * self.block_out_channels.len().saturating_sub(1)
    }

    fn validate(&self) -> Result<(), ControlNetError> {
        let invalid = |field, reason: &str| ControlNetError::InvalidConfig { field, reason: reason.to_string() };
        if self.block_out_channels.is_empty() {
            return Err(invalid("block_out_channels", "must not be empty"));
        }
        if self.block_out_channels.contains(&0) {
            return Err(invalid("block_out_channels", "channels must be positive"));
        }
        if self.conditioning_embedding_channels == 0 {
            return Err(invalid("conditioning_embedding_channels", "must be positive"));
        }
        if self.conditioning_channels == 0 {
            return Err(invalid("conditioning_channels", "must be positive"));
        }
        Ok(())
    }
}

/// Encodes a conditioning image `[batch, conditioning_channels, h, w]` into features
/// `[batch, conditioning_embedding_channels, h', w']`.
#[derive(Debug, Clone)]
pub struct ControlNetConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ControlNetConditioningEmbedding {
    /// Builds the module from `vb` positioned at the module, i.e. holding `conv_in.weight`,
    /// `blocks.{n}.weight`, `conv_out.weight` (and biases); for a diffusers checkpoint that is
    /// `vb.pp(DIFFUSERS_PREFIX)`.
    pub fn new(config: &ControlNetConditioningEmbeddingConfig, vb: VarBuilder) -> Result<Self, ControlNetError> {
        config.validate()?;
        let channels = &config.block_out_channels;
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        let down = Conv2dConfig { stride: 2, ..same };

        let conv_in = conv2d(&vb, "conv_in", config.conditioning_channels, channels[0], 3, same)?;
        let vb_blocks = vb.pp("blocks");
        let mut blocks = Vec::with_capacity(config.num_blocks());
        for (i, pair) in channels.windows(2).enumerate() {
            let (c_in, c_out) = (pair[0], pair[1]);
            blocks.push(conv2d(&vb_blocks, &(2 * i).to_string(), c_in, c_in, 3, same)?);
            blocks.push(conv2d(&vb_blocks, &(2 * i + 1).to_string(), c_in, c_out, 3, down)?);
        }
        let last = channels[channels.len() - 1];
        let conv_out = conv2d(&vb, "conv_out", last, config.conditioning_embedding_channels, 3, same)?;
        Ok(Self { conv_in, blocks, conv_out })
    }
}

impl Module for ControlNetConditioningEmbedding {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?.silu()?;
        for block in &self.blocks {
            xs = block.forward(&xs)?.silu()?;
        }
        self.conv_out.forward(&xs)
    }
}

impl VisitLayers for ControlNetConditioningEmbedding {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.conv_in.visit_layers(f);
        self.blocks.visit_layers(f);
        self.conv_out.visit_layers(f);
    }
}
