//! diffusers `AutoencoderKL`: encoder, decoder, the diagonal Gaussian posterior, and the
//! tiled encode/decode that keeps large images in bounded memory.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::attention::Attention;
use crate::cpu::norm::GroupNorm;
use crate::error::{DiffusionError, Result};
use crate::layers::{Activation, Conv2d};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, TimeEmbeddingNorm, Upsample2D};

/// diffusers' `vae/config.json`, with diffusers' field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Checks the config against what this crate implements.
    pub fn validate(&self) -> std::result::Result<(), crate::unet_2d_condition::ConfigIssue> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(("block_out_channels", "is empty".into()));
        }
        if self.down_block_types.len() != n || self.down_block_types.iter().any(|t| t != "DownEncoderBlock2D") {
            return Err(("down_block_types", format!("need {n} × DownEncoderBlock2D")));
        }
        if self.up_block_types.len() != n || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") {
            return Err(("up_block_types", format!("need {n} × UpDecoderBlock2D")));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            return Err(("norm_num_groups", format!("{} groups do not divide {c} channels", self.norm_num_groups)));
        }
        if Activation::from_name(&self.act_fn).is_none() {
            return Err(("act_fn", format!("unsupported activation {}", self.act_fn)));
        }
        Ok(())
    }

    /// The spatial down-sampling factor between image and latents.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn resnet(&self, cin: usize, cout: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: 1e-6,
            act: Activation::from_name(&self.act_fn).unwrap_or(Activation::Silu),
            time_embedding_norm: TimeEmbeddingNorm::Default,
            output_scale_factor: 1.0,
        }
    }
}

/// The VAE's single-head self-attention over all pixels, with group norm and residual.
#[derive(Debug, Clone)]
struct SpatialSelfAttention {
    group_norm: GroupNorm,
    attention: Attention,
}

impl SpatialSelfAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, 1e-6)?,
            attention: Attention::new(vb, channels, channels, 1, channels, true, true)?,
        })
    }
}

impl Module for SpatialSelfAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let out = self.attention.forward(&tokens, None)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
#[derive(Debug, Clone)]
struct VaeMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialSelfAttention>,
}

impl VaeMidBlock {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig, channels: usize) -> candle_core::Result<Self> {
        let r = cfg.resnet(channels, channels);
        let attention = if cfg.mid_block_add_attention {
            Some(SpatialSelfAttention::new(vb.pp("attentions").pp(0), channels, cfg.norm_num_groups)?)
        } else {
            None
        };
        Ok(Self {
            resnets: [ResnetBlock2D::new(vb.pp("resnets").pp(0), r)?, ResnetBlock2D::new(vb.pp("resnets").pp(1), r)?],
            attention,
        })
    }
}

impl Module for VaeMidBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            x = attn.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

/// diffusers `Encoder` (`DownEncoderBlock2D`s, mid block, `conv_out` to mean and log-variance).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut down_blocks = Vec::with_capacity(n);
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock2D::new(vb.pp("resnets").pp(j), cfg.resnet(if j == 0 { prev } else { out }, out)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let down = if i + 1 < n { Some(Downsample2D::new(vb.pp("downsamplers").pp(0), out, 0)?) } else { None };
            down_blocks.push((resnets, down));
            prev = out;
        }
        let last = ch[n - 1];
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(vb.pp("mid_block"), cfg, last)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, last, 1e-6)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
            act: cfg.resnet(1, 1).act,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for (resnets, down) in &self.down_blocks {
            for resnet in resnets {
                x = resnet.forward(&x, None)?;
            }
            if let Some(down) = down {
                x = down.forward(&x)?;
            }
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out.forward(&self.conv_norm_out.forward_act(&x, Some(self.act))?)
    }
}

/// diffusers `Decoder` (mid block, `UpDecoderBlock2D`s, `conv_out` to pixels).
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = ch[n - 1];
        for i in 0..n {
            let out = ch[n - 1 - i];
            let vb = vb.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| ResnetBlock2D::new(vb.pp("resnets").pp(j), cfg.resnet(if j == 0 { prev } else { out }, out)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let up = if i + 1 < n { Some(Upsample2D::new(vb.pp("upsamplers").pp(0), out)?) } else { None };
            up_blocks.push((resnets, up));
            prev = out;
        }
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, ch[n - 1], 3, 1, 1)?,
            mid_block: VaeMidBlock::new(vb.pp("mid_block"), cfg, ch[n - 1])?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, ch[0], 1e-6)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            act: cfg.resnet(1, 1).act,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for (resnets, up) in &self.up_blocks {
            for resnet in resnets {
                x = resnet.forward(&x, None)?;
            }
            if let Some(up) = up {
                x = up.forward(&x, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_act(&x, Some(self.act))?)
    }
}

/// The encoder's output distribution (diffusers `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20].
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    fn from_moments(moments: &Tensor) -> candle_core::Result<Self> {
        let c = moments.dim(1)? / 2;
        Ok(Self { mean: moments.narrow(1, 0, c)?, logvar: moments.narrow(1, c, c)?.clamp(-30f32, 20f32)? })
    }

    pub fn std(&self) -> candle_core::Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std · noise`, with `noise` standard normal of the mean's shape.
    pub fn sample_with(&self, noise: &Tensor) -> candle_core::Result<Tensor> {
        self.mean.broadcast_add(&self.std()?.broadcast_mul(noise)?)
    }

    /// A sample drawn with candle's generator.
    pub fn sample(&self) -> candle_core::Result<Tensor> {
        self.sample_with(&self.mean.randn_like(0.0, 1.0)?)
    }
}

/// Tile sizes for [`AutoencoderKL`]'s tiled encode/decode (diffusers `enable_tiling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// Image-space tile size (diffusers `tile_sample_min_size`).
    pub sample_size: usize,
    /// Latent-space tile size (diffusers `tile_latent_min_size`).
    pub latent_size: usize,
    /// Fraction of a tile that overlaps its neighbour (diffusers `tile_overlap_factor`).
    pub overlap: f64,
}

/// diffusers `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    tiling: Option<Tiling>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Builds the model from `vb`, whose paths are the diffusers key names.
    pub fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        config.validate().map_err(|(field, msg)| DiffusionError::config("VAE config", field, msg))?;
        let l2 = 2 * config.latent_channels;
        let quant_conv =
            if config.use_quant_conv { Some(Conv2d::new(vb.pp("quant_conv"), l2, l2, 1, 1, 0)?) } else { None };
        let post_quant_conv = if config.use_post_quant_conv {
            let l = config.latent_channels;
            Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            tiling: None,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The latent scaling factor (0.18215 for SD1.x/2.x, 0.13025 for SDXL).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// diffusers' default tiling for this config: tiles of `sample_size` pixels, overlap 0.25.
    pub fn default_tiling(&self) -> Tiling {
        let s = self.config.sample_size;
        Tiling { sample_size: s, latent_size: s / self.config.downscale_factor(), overlap: 0.25 }
    }

    /// Encodes and decodes larger inputs tile by tile (`None` turns tiling off).
    pub fn set_tiling(&mut self, tiling: Option<Tiling>) {
        self.tiling = tiling;
    }

    /// Images `[B, 3, H, W]` in [-1, 1] to the latent distribution.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let (_, _, h, w) = images.dims4()?;
        let moments = match self.tiling {
            Some(t) if h > t.sample_size || w > t.sample_size => {
                let (tile, out_tile) = (t.sample_size, t.latent_size);
                tiled(images, tile, out_tile, t.overlap, |x| self.encode_moments(x))?
            }
            _ => self.encode_moments(images)?,
        };
        Ok(DiagonalGaussian::from_moments(&moments)?)
    }

    fn encode_moments(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.encoder.forward(images)?;
        match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => Ok(h),
        }
    }

    /// Unscaled latents `[B, C, h, w]` to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        Ok(match self.tiling {
            Some(t) if h > t.latent_size || w > t.latent_size => {
                tiled(latents, t.latent_size, t.sample_size, t.overlap, |z| self.decode_tile(z))?
            }
            _ => self.decode_tile(latents)?,
        })
    }

    fn decode_tile(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }
}

/// diffusers' tiling: run `f` on overlapping `tile`-sized windows, cross-fade each result with
/// its upper and left neighbours over `overlap · out_tile` rows/columns, and stitch the kept
/// parts.
fn tiled(
    x: &Tensor,
    tile: usize,
    out_tile: usize,
    overlap: f64,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let stride = (tile as f64 * (1.0 - overlap)) as usize;
    let blend = (out_tile as f64 * overlap) as usize;
    let keep = out_tile - blend;
    if stride == 0 {
        candle_core::bail!("tile size {tile} with overlap {overlap} gives a zero stride")
    }
    let mut rows: Vec<Vec<Tensor>> = vec![];
    for i in (0..h).step_by(stride) {
        let mut row: Vec<Tensor> = vec![];
        for j in (0..w).step_by(stride) {
            let window = x.narrow(2, i, tile.min(h - i))?.narrow(3, j, tile.min(w - j))?;
            let mut out = f(&window)?;
            if let Some(above) = rows.last() {
                out = blend_edge(&above[row.len()], &out, blend, 2)?;
            }
            if let Some(left) = row.last() {
                out = blend_edge(left, &out, blend, 3)?;
            }
            row.push(out);
        }
        rows.push(row);
    }
    let rows = rows
        .iter()
        .map(|row| {
            let kept = row
                .iter()
                .map(|t| t.narrow(2, 0, keep.min(t.dim(2)?))?.narrow(3, 0, keep.min(t.dim(3)?)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&kept, 3)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&rows, 2)
}

/// Cross-fades the first `extent` rows (`dim` 2) or columns (`dim` 3) of `b` from the last
/// ones of `a` (diffusers `blend_v` / `blend_h`).
fn blend_edge(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let mut shape = vec![1usize; 4];
    shape[dim] = extent;
    let wb: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let wa: Vec<f32> = (0..extent).map(|y| (1.0 - y as f64 / extent as f64) as f32).collect();
    let wb = Tensor::from_vec(wb, shape.as_slice(), b.device())?.to_dtype(b.dtype())?;
    let wa = Tensor::from_vec(wa, shape.as_slice(), b.device())?.to_dtype(b.dtype())?;
    let a_tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = (a_tail.broadcast_mul(&wa)? + b.narrow(dim, 0, extent)?.broadcast_mul(&wb)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Tensor::cat(&[head, rest], dim)
}
