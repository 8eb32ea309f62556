//! diffusers `resnet.py` and `downsampling.py` / `upsampling.py`: the residual block and the
//! 2× resamplers shared by the UNet and the VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::cpu::norm::GroupNorm;
use crate::layers::{Activation, Conv2d, LayerMut, Linear, VisitLayers};

/// How the time embedding enters a [`ResnetBlock2D`] (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// Added to the hidden states before `norm2`.
    Default,
    /// Split into scale and shift applied after `norm2`.
    ScaleShift,
}

/// Construction parameters of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    cfg: ResnetConfig,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: ResnetConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => {
                let out = match cfg.time_embedding_norm {
                    TimeEmbeddingNorm::Default => cout,
                    TimeEmbeddingNorm::ScaleShift => 2 * cout,
                };
                Some(Linear::new(vb.pp("time_emb_proj"), t, out, true)?)
            }
            None => None,
        };
        let conv_shortcut =
            if cin != cout { Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            cfg,
        })
    }

    /// `temb` is `[B, temb_channels]`, or `None` for blocks built without a time embedding.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let act = self.cfg.act;
        let h = self.conv1.forward(&self.norm1.forward_act(x, Some(act))?)?;
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(&act.forward(t)?)?.unsqueeze(2)?.unsqueeze(3)?),
            _ => None,
        };
        let h = match (self.cfg.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::Default, Some(t)) => self.norm2.forward_act(&h.broadcast_add(&t)?, Some(act))?,
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                let (scale, shift) = (
                    t.narrow(1, 0, self.cfg.out_channels)?,
                    t.narrow(1, self.cfg.out_channels, self.cfg.out_channels)?,
                );
                act.forward(&self.norm2.forward(&h)?.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?)?
            }
            (_, None) => self.norm2.forward_act(&h, Some(act))?,
        };
        let h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.cfg.output_scale_factor == 1.0 { Ok(out) } else { out / self.cfg.output_scale_factor }
    }
}

impl VisitLayers for ResnetBlock2D {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.conv1.visit_layers(f);
        self.time_emb_proj.visit_layers(f);
        self.conv2.visit_layers(f);
        self.conv_shortcut.visit_layers(f);
    }
}

/// diffusers `Downsample2D` with `use_conv=True`: a stride-2 3×3 convolution. With `padding == 0`
/// (the VAE) the input is first padded by one on the right and bottom, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 2, padding)?, padding })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            self.conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
        } else {
            self.conv.forward(x)
        }
    }
}

impl VisitLayers for Downsample2D {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.conv.visit_layers(f)
    }
}

/// diffusers `Upsample2D` with `use_conv=True`: nearest-neighbour resize (2×, or to an explicit
/// size when the skip connection is odd-sized), then a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let up = match size {
            Some((th, tw)) if (th, tw) != (2 * h, 2 * w) => x.upsample_nearest2d(th, tw)?,
            // A broadcast instead of `upsample_nearest2d`: candle's backward of the latter
            // overwrites instead of accumulating when the input has other consumers.
            _ => x.unsqueeze(3)?.unsqueeze(5)?.broadcast_as((b, c, h, 2, w, 2))?.reshape((b, c, 2 * h, 2 * w))?,
        };
        self.conv.forward(&up)
    }
}

impl VisitLayers for Upsample2D {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.conv.visit_layers(f)
    }
}
