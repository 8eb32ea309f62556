//! The down, mid and up blocks of the UNet (diffusers `unet_2d_blocks.py`). A block with an
//! empty `attentions` list is the plain `DownBlock2D` / `UpBlock2D`; with attentions it is the
//! `CrossAttn…` variant. The key names are the same either way.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::attention::{Transformer2DModel, TransformerConfig};
use crate::layers::{LayerMut, VisitLayers};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `resnet.in_channels` is the block input; `transformer` is `None` for `DownBlock2D`.
    pub fn new(
        vb: VarBuilder,
        layers: usize,
        resnet: ResnetConfig,
        transformer: Option<&TransformerConfig>,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let out = resnet.out_channels;
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = vec![];
        for i in 0..layers {
            let cfg = ResnetConfig { in_channels: if i == 0 { resnet.in_channels } else { out }, ..resnet };
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), cfg)?);
            if let Some(t) = transformer {
                attentions.push(Transformer2DModel::new(vb.pp("attentions").pp(i), out, t)?);
            }
        }
        let downsampler = match downsample_padding {
            Some(p) => Some(Downsample2D::new(vb.pp("downsamplers").pp(0), out, p)?),
            None => None,
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and the skip states it adds to the stack (one per layer, plus one
    /// after the downsampler).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            states.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = candle_core::Module::forward(down, &x)?;
            states.push(x.clone());
        }
        Ok((x, states))
    }
}

impl VisitLayers for DownBlock {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        for (i, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.visit_layers(f);
            if let Some(attn) = self.attentions.get_mut(i) {
                attn.visit_layers(f);
            }
        }
        self.downsampler.visit_layers(f);
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, resnet: ResnetConfig, transformer: &TransformerConfig) -> Result<Self> {
        let channels = resnet.in_channels;
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::new(vb.pp("resnets").pp(0), resnet)?,
                ResnetBlock2D::new(vb.pp("resnets").pp(1), resnet)?,
            ],
            attentions: vec![Transformer2DModel::new(vb.pp("attentions").pp(0), channels, transformer)?],
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, context: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, temb)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(&attn.forward(&x, context)?, temb)?;
        }
        Ok(x)
    }
}

impl VisitLayers for MidBlock {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.resnets[0].visit_layers(f);
        for (attn, resnet) in self.attentions.iter_mut().zip(&mut self.resnets[1..]) {
            attn.visit_layers(f);
            resnet.visit_layers(f);
        }
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Channel counts of an up block: its input, its output, and the skip input of its last resnet.
#[derive(Debug, Clone, Copy)]
pub struct UpBlockChannels {
    pub prev_output: usize,
    pub out: usize,
    pub skip_in: usize,
}

impl UpBlock {
    pub fn new(
        vb: VarBuilder,
        layers: usize,
        channels: UpBlockChannels,
        resnet: ResnetConfig,
        transformer: Option<&TransformerConfig>,
        add_upsample: bool,
    ) -> Result<Self> {
        let out = channels.out;
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = vec![];
        for i in 0..layers {
            let skip = if i == layers - 1 { channels.skip_in } else { out };
            let input = if i == 0 { channels.prev_output } else { out };
            let cfg = ResnetConfig { in_channels: input + skip, out_channels: out, ..resnet };
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), cfg)?);
            if let Some(t) = transformer {
                attentions.push(Transformer2DModel::new(vb.pp("attentions").pp(i), out, t)?);
            }
        }
        let upsampler = if add_upsample { Some(Upsample2D::new(vb.pp("upsamplers").pp(0), out)?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip states in stack order (the last one is used first).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: Option<&Tensor>,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            x = resnet.forward(&Tensor::cat(&[&x, skip], 1)?, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

impl VisitLayers for UpBlock {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        for (i, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.visit_layers(f);
            if let Some(attn) = self.attentions.get_mut(i) {
                attn.visit_layers(f);
            }
        }
        self.upsampler.visit_layers(f);
    }
}
