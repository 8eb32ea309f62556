//! diffusers `UNet2DConditionModel` for SD1.x, SD2.x, SDXL and their inpainting variants.

use candle_core::{DType, Module, Tensor};
use candle_nn::{GroupNorm, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::attention::TransformerConfig;
use crate::embeddings::{TimestepEmbedding, timestep_embedding};
use crate::error::{DiffusionError, Result};
use crate::layers::{Activation, Conv2d, LayerMut, VisitLayers};
use crate::resnet::{ResnetConfig, TimeEmbeddingNorm};
use crate::unet_2d_blocks::{DownBlock, MidBlock, UpBlock, UpBlockChannels};

/// A config value given once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The values for `n` blocks, or `None` when a list has the wrong length.
    pub fn expand(&self, n: usize) -> Option<Vec<T>> {
        match self {
            Self::All(v) => Some(vec![*v; n]),
            Self::Each(v) if v.len() == n => Some(v.clone()),
            Self::Each(_) => None,
        }
    }
}

/// diffusers' `unet/config.json`, with diffusers' field names and defaults. Fields that select
/// architectures this crate does not implement are read so that they can be refused by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionModelConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    pub cross_attention_norm: Option<String>,
}

impl Default for UNet2DConditionModelConfig {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("DownBlock2D"),
            ],
            mid_block_type: Some(s("UNetMidBlock2DCrossAttn")),
            up_block_types: vec![
                s("UpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
            ],
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: s("silu"),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: PerBlock::All(1),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: s("default"),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: s("positional"),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: s("default"),
            cross_attention_norm: None,
        }
    }
}

/// A config problem: the offending field and what is wrong with it.
pub type ConfigIssue = (&'static str, String);

/// The per-block values of a config, expanded and checked.
#[derive(Debug, Clone)]
struct Resolved {
    cross_attn: Vec<bool>,
    up_cross_attn: Vec<bool>,
    layers: Vec<usize>,
    heads: Vec<usize>,
    cross_dims: Vec<usize>,
    transformer_layers: Vec<usize>,
    only_cross: Vec<bool>,
    act: Activation,
    time_norm: TimeEmbeddingNorm,
    groups: usize,
}

impl UNet2DConditionModelConfig {
    /// Checks the config against what this crate implements.
    pub fn validate(&self) -> std::result::Result<(), ConfigIssue> {
        self.resolve().map(|_| ())
    }

    /// Whether the model expects SDXL's `text_embeds` and `time_ids`.
    pub fn uses_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    fn resolve(&self) -> std::result::Result<Resolved, ConfigIssue> {
        let n = self.block_out_channels.len();
        let unsupported =
            |field: &'static str, v: &dyn std::fmt::Debug| Err((field, format!("unsupported value {v:?}")));
        if n == 0 {
            return Err(("block_out_channels", "is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(("down_block_types", format!("need {n} down and up block types, one per block_out_channels")));
        }
        let cross_attn = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                _ => Err(("down_block_types", format!("unsupported block type {t}"))),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let up_cross_attn = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                _ => Err(("up_block_types", format!("unsupported block type {t}"))),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(t) => return unsupported("mid_block_type", &t),
        }
        let per_block =
            |field: &'static str, v: &PerBlock<usize>| v.expand(n).ok_or((field, format!("needs {n} values")));
        let layers = per_block("layers_per_block", &self.layers_per_block)?;
        let heads =
            per_block("attention_head_dim", self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim))?;
        let cross_dims = per_block("cross_attention_dim", &self.cross_attention_dim)?;
        let transformer_layers = per_block("transformer_layers_per_block", &self.transformer_layers_per_block)?;
        let only_cross =
            self.only_cross_attention.expand(n).ok_or(("only_cross_attention", format!("needs {n} values")))?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if (cross_attn[i] || up_cross_attn[n - 1 - i]) && (h == 0 || c % h != 0) {
                return Err(("attention_head_dim", format!("{h} heads do not divide {c} channels")));
            }
        }
        let groups = self.norm_num_groups.ok_or(("norm_num_groups", "null is not supported".to_string()))?;
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % groups != 0) {
            return Err(("norm_num_groups", format!("{groups} groups do not divide {c} channels")));
        }
        let act =
            Activation::from_name(&self.act_fn).ok_or(("act_fn", format!("unsupported activation {}", self.act_fn)))?;
        let time_norm = match self.resnet_time_scale_shift.as_str() {
            "default" => TimeEmbeddingNorm::Default,
            "scale_shift" => TimeEmbeddingNorm::ScaleShift,
            v => return unsupported("resnet_time_scale_shift", &v),
        };
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &self.time_embedding_type);
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return unsupported("class_embed_type", &self.class_embed_type);
        }
        if self.encoder_hid_dim_type.is_some() {
            return unsupported("encoder_hid_dim_type", &self.encoder_hid_dim_type);
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", &true);
        }
        if self.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act", &true);
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", &self.attention_type);
        }
        if self.cross_attention_norm.is_some() {
            return unsupported("cross_attention_norm", &self.cross_attention_norm);
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err(("conv_in_kernel", "kernels must be odd".into()));
        }
        if let Some(t) = self.addition_embed_type.as_deref() {
            if t != "text_time" {
                return unsupported("addition_embed_type", &t);
            }
            if self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none() {
                return Err((
                    "addition_time_embed_dim",
                    "text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim".into(),
                ));
            }
        }
        for (field, v) in
            [("time_embedding_act_fn", &self.time_embedding_act_fn), ("timestep_post_act", &self.timestep_post_act)]
        {
            if let Some(name) = v
                && Activation::from_name(name).is_none()
            {
                return unsupported(field, name);
            }
        }
        Ok(Resolved {
            cross_attn,
            up_cross_attn,
            layers,
            heads,
            cross_dims,
            transformer_layers,
            only_cross,
            act,
            time_norm,
            groups,
        })
    }
}

/// Extra inputs of [`UNet2DConditionModel::forward`] beyond sample, timesteps and text.
#[derive(Debug, Default, Clone, Copy)]
pub struct UNetConditioning<'a> {
    /// SDXL: pooled, projected text embeddings `[B, D]`.
    pub text_embeds: Option<&'a Tensor>,
    /// SDXL: `[B, 6]` original size, crop top-left and target size.
    pub time_ids: Option<&'a Tensor>,
    /// LCM-distilled UNets (`time_cond_proj_dim`): the guidance embedding `[B, D]`.
    pub timestep_cond: Option<&'a Tensor>,
    /// ControlNet residuals, one per skip state (diffusers `down_block_additional_residuals`).
    pub down_block_additional_residuals: Option<&'a [Tensor]>,
    /// ControlNet residual for the mid block (`mid_block_additional_residual`).
    pub mid_block_additional_residual: Option<&'a Tensor>,
}

/// diffusers `UNet2DConditionModel`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    time_embed_act: Option<Activation>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    config: UNet2DConditionModelConfig,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb`, whose paths are the diffusers key names.
    pub fn new(vb: VarBuilder, config: &UNet2DConditionModelConfig) -> Result<Self> {
        let r = config.resolve().map_err(|(field, msg)| DiffusionError::config("UNet config", field, msg))?;
        let c = config;
        let n = c.block_out_channels.len();
        let ch0 = c.block_out_channels[0];
        let temb_dim = c.time_embedding_dim.unwrap_or(4 * ch0);
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            ch0,
            temb_dim,
            r.act,
            parse_act(&c.timestep_post_act),
            c.time_cond_proj_dim,
        )?;
        let add_embedding = match (c.uses_text_time(), c.projection_class_embeddings_input_dim) {
            (true, Some(dim)) => {
                Some(TimestepEmbedding::new(vb.pp("add_embedding"), dim, temb_dim, r.act, None, None)?)
            }
            _ => None,
        };
        let resnet = |cin: usize, cout: usize, scale: f64| ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(temb_dim),
            groups: r.groups,
            eps: c.norm_eps,
            act: r.act,
            time_embedding_norm: r.time_norm,
            output_scale_factor: scale,
        };
        let transformer = |i: usize, layers: usize, heads: usize, cross: usize, only: bool| TransformerConfig {
            heads,
            head_dim: c.block_out_channels[i] / heads,
            layers,
            cross_attention_dim: cross,
            groups: r.groups,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: only,
            upcast_attention: c.upcast_attention,
        };
        let pad = (c.conv_in_kernel - 1) / 2;
        let conv_in = Conv2d::new(vb.pp("conv_in"), c.in_channels, ch0, c.conv_in_kernel, 1, pad)?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut prev = ch0;
        for i in 0..n {
            let out = c.block_out_channels[i];
            let t = transformer(i, r.transformer_layers[i], r.heads[i], r.cross_dims[i], r.only_cross[i]);
            let downsample = (i + 1 < n).then_some(c.downsample_padding);
            let vb = vb.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::new(
                vb,
                r.layers[i],
                resnet(prev, out, c.resnet_out_scale_factor),
                r.cross_attn[i].then_some(&t),
                downsample,
            )?);
            prev = out;
        }
        let mid_block = match c.mid_block_type {
            Some(_) => {
                let last = c.block_out_channels[n - 1];
                let t = transformer(
                    n - 1,
                    r.transformer_layers[n - 1],
                    r.heads[n - 1],
                    r.cross_dims[n - 1],
                    r.only_cross[n - 1],
                );
                Some(MidBlock::new(vb.pp("mid_block"), resnet(last, last, c.mid_block_scale_factor), &t)?)
            }
            None => None,
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_output = c.block_out_channels[n - 1];
        for i in 0..n {
            let rev = n - 1 - i;
            let out = c.block_out_channels[rev];
            let channels = UpBlockChannels { prev_output, out, skip_in: c.block_out_channels[rev.saturating_sub(1)] };
            let t = transformer(rev, r.transformer_layers[rev], r.heads[rev], r.cross_dims[rev], r.only_cross[rev]);
            let vb = vb.pp("up_blocks").pp(i);
            let attn = r.up_cross_attn[i].then_some(&t);
            up_blocks.push(UpBlock::new(
                vb,
                r.layers[rev] + 1,
                channels,
                resnet(0, out, c.resnet_out_scale_factor),
                attn,
                i + 1 < n,
            )?);
            prev_output = out;
        }
        let pad = (c.conv_out_kernel - 1) / 2;
        Ok(Self {
            conv_in,
            time_embedding,
            add_embedding,
            time_embed_act: parse_act(&c.time_embedding_act_fn),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: candle_nn::group_norm(r.groups, ch0, c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch0, c.out_channels, c.conv_out_kernel, 1, pad)?,
            act: r.act,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConditionModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.conv_in.weight().device()
    }

    /// Predicts the noise (or v, or x₀) for `sample` `[B, C, H, W]` at `timesteps` (`[B]`, one
    /// per sample, or `[1]` / a scalar for the whole batch) given `encoder_hidden_states`
    /// `[B, L, D]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        let (batch, channels, height, width) = sample
            .dims4()
            .map_err(|_| DiffusionError::input("sample", format!("expected [B, C, H, W], got {:?}", sample.dims())))?;
        if channels != self.config.in_channels {
            return Err(DiffusionError::input(
                "sample",
                format!("expected {} channels, got {channels}", self.config.in_channels),
            ));
        }
        let dtype = sample.dtype();
        let timesteps = match timesteps.elem_count() {
            1 => timesteps.flatten_all()?.broadcast_as(batch)?.contiguous()?,
            n if n == batch => timesteps.flatten_all()?,
            n => return Err(DiffusionError::input("timesteps", format!("expected 1 or {batch} values, got {n}"))),
        };
        let cfg = &self.config;
        let t_emb = timestep_embedding(&timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)?
            .to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb, cond.timestep_cond)?;
        if let Some(add) = &self.add_embedding {
            let (Some(text_embeds), Some(time_ids)) = (cond.text_embeds, cond.time_ids) else {
                return Err(DiffusionError::input(
                    "text_embeds",
                    "an SDXL UNet needs text_embeds and time_ids".to_string(),
                ));
            };
            let dim = cfg.addition_time_embed_dim.unwrap_or_default();
            let time_embeds = timestep_embedding(&time_ids.flatten_all()?, dim, cfg.flip_sin_to_cos, cfg.freq_shift)?
                .reshape((text_embeds.dim(0)?, ()))?;
            let add_embeds = Tensor::cat(&[text_embeds.to_dtype(DType::F32)?, time_embeds], 1)?.to_dtype(dtype)?;
            emb = (emb + add.forward(&add_embeds, None)?)?;
        }
        if let Some(act) = self.time_embed_act {
            emb = act.forward(&emb)?;
        }

        let up_factor = 1usize << (self.up_blocks.len() - 1);
        let odd_size = height % up_factor != 0 || width % up_factor != 0;
        let sample = if cfg.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };
        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&x, Some(&emb), encoder_hidden_states)?;
            x = out;
            skips.extend(states);
        }
        if let Some(residuals) = cond.down_block_additional_residuals {
            if residuals.len() != skips.len() {
                return Err(DiffusionError::input(
                    "down_block_additional_residuals",
                    format!("expected {} tensors, got {}", skips.len(), residuals.len()),
                ));
            }
            skips = skips.iter().zip(residuals).map(|(s, r)| s + r).collect::<candle_core::Result<_>>()?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, Some(&emb), encoder_hidden_states)?;
        }
        if let Some(r) = cond.mid_block_additional_residual {
            x = (x + r)?;
        }
        let last = self.up_blocks.len() - 1;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let block_skips = skips.split_off(skips.len() - block.num_layers());
            let upsample_size = match skips.last() {
                Some(next) if i < last && odd_size => Some((next.dim(2)?, next.dim(3)?)),
                _ => None,
            };
            x = block.forward(&x, &block_skips, Some(&emb), encoder_hidden_states, upsample_size)?;
        }
        let x = self.act.forward(&self.conv_norm_out.forward(&x)?)?;
        Ok(self.conv_out.forward(&x)?)
    }
}

fn parse_act(name: &Option<String>) -> Option<Activation> {
    name.as_deref().and_then(Activation::from_name)
}

impl VisitLayers for UNet2DConditionModel {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.conv_in.visit_layers(f);
        self.time_embedding.visit_layers(f);
        self.add_embedding.visit_layers(f);
        self.down_blocks.visit_layers(f);
        self.mid_block.visit_layers(f);
        self.up_blocks.visit_layers(f);
        self.conv_out.visit_layers(f);
    }
}
