//! diffusers `ControlNetModel`: a copy of the UNet's encoder (conv_in, time embedding, down
//! blocks, mid block; built from `easyphoto-diffusion`'s blocks) whose input is the latent plus the
//! encoded conditioning image, and whose skip states and mid-block output go through 1×1
//! "zero convs" (`controlnet_down_blocks`, `controlnet_mid_block`) to become the residuals the
//! UNet adds to its own skip connections.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use easyphoto_diffusion::attention::TransformerConfig;
use easyphoto_diffusion::embeddings::{TimestepEmbedding, timestep_embedding};
use easyphoto_diffusion::layers::{Activation, Conv2d, LayerMut, VisitLayers};
use easyphoto_diffusion::resnet::{ResnetConfig, TimeEmbeddingNorm};
use easyphoto_diffusion::sampling::Residuals;
use easyphoto_diffusion::unet_2d_blocks::{DownBlock, MidBlock};
use easyphoto_diffusion::unet_2d_condition::{ConfigIssue, PerBlock, UNet2DConditionModelConfig, UNetConditioning};
use serde::{Deserialize, Serialize};

use crate::{
    ControlNetConditioningEmbedding, ControlNetConditioningEmbeddingConfig, ControlNetError, DIFFUSERS_PREFIX,
};

/// diffusers' ControlNet `config.json`, with diffusers' field names and defaults (those of the
/// SD 1.5 ControlNets). Fields selecting architectures this crate does not implement are read so
/// that they can be refused by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    pub in_channels: usize,
    pub conditioning_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// `rgb`, or `bgr` for models trained on BGR images (the input's channels are flipped).
    pub controlnet_conditioning_channel_order: String,
    pub conditioning_embedding_out_channels: Option<Vec<usize>>,
    pub global_pool_conditions: bool,
    pub addition_embed_type_num_heads: usize,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        let unet = UNet2DConditionModelConfig::default();
        Self {
            in_channels: 4,
            conditioning_channels: 3,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: unet.down_block_types,
            mid_block_type: unet.mid_block_type,
            only_cross_attention: PerBlock::All(false),
            block_out_channels: unet.block_out_channels,
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: PerBlock::All(1),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            projection_class_embeddings_input_dim: None,
            controlnet_conditioning_channel_order: "rgb".into(),
            conditioning_embedding_out_channels: Some(vec![16, 32, 96, 256]),
            global_pool_conditions: false,
            addition_embed_type_num_heads: 64,
        }
    }
}

/// The per-block values of a checked config.
struct Resolved {
    heads: Vec<usize>,
    transformer_layers: Vec<usize>,
    only_cross: Vec<bool>,
    cross_attn: Vec<bool>,
    act: Activation,
    time_norm: TimeEmbeddingNorm,
    groups: usize,
    hint: ControlNetConditioningEmbeddingConfig,
}

impl ControlNetConfig {
    /// The UNet config whose encoder this ControlNet copies (up blocks mirror the down blocks).
    /// [`ControlNetConfig::validate`] checks the shared fields through it.
    pub fn unet_config(&self) -> UNet2DConditionModelConfig {
        let up_block_types = self.down_block_types.iter().rev().map(|t| t.replacen("Down", "Up", 1)).collect();
        UNet2DConditionModelConfig {
            in_channels: self.in_channels,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            down_block_types: self.down_block_types.clone(),
            mid_block_type: self.mid_block_type.clone(),
            up_block_types,
            only_cross_attention: self.only_cross_attention.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: PerBlock::All(self.layers_per_block),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            act_fn: self.act_fn.clone(),
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: PerBlock::All(self.cross_attention_dim),
            transformer_layers_per_block: self.transformer_layers_per_block.clone(),
            encoder_hid_dim: self.encoder_hid_dim,
            encoder_hid_dim_type: self.encoder_hid_dim_type.clone(),
            attention_head_dim: self.attention_head_dim.clone(),
            num_attention_heads: self.num_attention_heads.clone(),
            use_linear_projection: self.use_linear_projection,
            class_embed_type: self.class_embed_type.clone(),
            addition_embed_type: self.addition_embed_type.clone(),
            addition_time_embed_dim: self.addition_time_embed_dim,
            num_class_embeds: self.num_class_embeds,
            upcast_attention: self.upcast_attention,
            resnet_time_scale_shift: self.resnet_time_scale_shift.clone(),
            projection_class_embeddings_input_dim: self.projection_class_embeddings_input_dim,
            ..Default::default()
        }
    }

    /// Whether the model expects SDXL's `text_embeds` and `time_ids`.
    pub fn uses_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// The config of the hint encoder (`controlnet_cond_embedding`).
    pub fn conditioning_embedding(&self) -> ControlNetConditioningEmbeddingConfig {
        ControlNetConditioningEmbeddingConfig {
            conditioning_embedding_channels: self.block_out_channels.first().copied().unwrap_or_default(),
            block_out_channels: self
                .conditioning_embedding_out_channels
                .clone()
                .unwrap_or_else(|| vec![16, 32, 96, 256]),
            conditioning_channels: self.conditioning_channels,
        }
    }

    /// Number of residuals the model returns for the down blocks (12 for SD 1.5, 9 for SDXL).
    pub fn num_down_residuals(&self) -> usize {
        let n = self.block_out_channels.len();
        1 + n * self.layers_per_block + n.saturating_sub(1)
    }

    /// Checks the config against what this crate implements.
    pub fn validate(&self) -> Result<(), ConfigIssue> {
        self.resolve().map(|_| ())
    }

    fn resolve(&self) -> Result<Resolved, ConfigIssue> {
        self.unet_config().validate()?;
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(("mid_block_type", format!("unsupported value {:?}", self.mid_block_type)));
        }
        if self.global_pool_conditions {
            return Err(("global_pool_conditions", "pooled (shuffle) ControlNets are not supported".into()));
        }
        if !matches!(self.controlnet_conditioning_channel_order.as_str(), "rgb" | "bgr") {
            return Err((
                "controlnet_conditioning_channel_order",
                format!("unknown order {}", self.controlnet_conditioning_channel_order),
            ));
        }
        let n = self.block_out_channels.len();
        let needs = |field: &'static str| (field, format!("needs {n} values"));
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n)
            .ok_or_else(|| needs("attention_head_dim"))?;
        let transformer_layers =
            self.transformer_layers_per_block.expand(n).ok_or_else(|| needs("transformer_layers_per_block"))?;
        let only_cross = self.only_cross_attention.expand(n).ok_or_else(|| needs("only_cross_attention"))?;
        let cross_attn = self.down_block_types.iter().map(|t| t == "CrossAttnDownBlock2D").collect();
        let act = Activation::from_name(&self.act_fn).ok_or(("act_fn", format!("unsupported {}", self.act_fn)))?;
        let time_norm = match self.resnet_time_scale_shift.as_str() {
            "scale_shift" => TimeEmbeddingNorm::ScaleShift,
            _ => TimeEmbeddingNorm::Default,
        };
        let groups = self.norm_num_groups.ok_or(("norm_num_groups", "null is not supported".to_string()))?;
        let hint = self.conditioning_embedding();
        if hint.block_out_channels.is_empty() || hint.block_out_channels.contains(&0) {
            return Err(("conditioning_embedding_out_channels", "must be non-empty and positive".into()));
        }
        Ok(Resolved { heads, transformer_layers, only_cross, cross_attn, act, time_norm, groups, hint })
    }
}

/// diffusers `ControlNetModel` (SD 1.x / 2.x, SDXL with `text_time` conditioning, and the
/// reduced SDXL "mid" / "small" variants, which differ only in their config).
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    controlnet_cond_embedding: ControlNetConditioningEmbedding,
    down_blocks: Vec<DownBlock>,
    controlnet_down_blocks: Vec<Conv2d>,
    mid_block: MidBlock,
    controlnet_mid_block: Conv2d,
    config: ControlNetConfig,
}

impl ControlNetModel {
    /// Builds the model from `vb`, whose paths are the diffusers key names.
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> Result<Self, ControlNetError> {
        let r = config.resolve().map_err(|(field, reason)| ControlNetError::InvalidConfig { field, reason })?;
        let c = config;
        let n = c.block_out_channels.len();
        let ch0 = c.block_out_channels[0];
        let temb = 4 * ch0;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch0, temb, r.act, None, None)?;
        let add_embedding = match (c.uses_text_time(), c.projection_class_embeddings_input_dim) {
            (true, Some(dim)) => {
                Some(TimestepEmbedding::new(vb.pp("add_embedding"), dim, temb, Activation::Silu, None, None)?)
            }
            _ => None,
        };
        let resnet = |cin: usize, cout: usize, scale: f64| ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(temb),
            groups: r.groups,
            eps: c.norm_eps,
            act: r.act,
            time_embedding_norm: r.time_norm,
            output_scale_factor: scale,
        };
        let transformer = |i: usize| TransformerConfig {
            heads: r.heads[i],
            head_dim: c.block_out_channels[i] / r.heads[i],
            layers: r.transformer_layers[i],
            cross_attention_dim: c.cross_attention_dim,
            groups: r.groups,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: r.only_cross[i],
            upcast_attention: c.upcast_attention,
        };
        let zero_conv = |vb: VarBuilder, channels: usize| Conv2d::new(vb, channels, channels, 1, 1, 0);

        let conv_in = Conv2d::new(vb.pp("conv_in"), c.in_channels, ch0, 3, 1, 1)?;
        let controlnet_cond_embedding = ControlNetConditioningEmbedding::new(&r.hint, vb.pp(DIFFUSERS_PREFIX))?;
        let vb_zero = vb.pp("controlnet_down_blocks");
        let mut controlnet_down_blocks = vec![zero_conv(vb_zero.pp(0), ch0)?];
        let mut down_blocks = Vec::with_capacity(n);
        let mut prev = ch0;
        for (i, &out) in c.block_out_channels.iter().enumerate() {
            let last = i + 1 == n;
            let t = transformer(i);
            down_blocks.push(DownBlock::new(
                vb.pp("down_blocks").pp(i),
                c.layers_per_block,
                resnet(prev, out, 1.0),
                r.cross_attn[i].then_some(&t),
                (!last).then_some(c.downsample_padding),
            )?);
            for _ in 0..c.layers_per_block + usize::from(!last) {
                controlnet_down_blocks.push(zero_conv(vb_zero.pp(controlnet_down_blocks.len()), out)?);
            }
            prev = out;
        }
        let mid = c.block_out_channels[n - 1];
        let mid_block =
            MidBlock::new(vb.pp("mid_block"), resnet(mid, mid, c.mid_block_scale_factor), &transformer(n - 1))?;
        let controlnet_mid_block = zero_conv(vb.pp("controlnet_mid_block"), mid)?;
        Ok(Self {
            conv_in,
            time_embedding,
            add_embedding,
            controlnet_cond_embedding,
            down_blocks,
            controlnet_down_blocks,
            mid_block,
            controlnet_mid_block,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.conv_in.weight().device()
    }

    /// Encodes a conditioning image `[B, conditioning_channels, H, W]` (values in [0, 1], RGB)
    /// to latent-resolution features. It does not depend on the step, so a sampler computes it
    /// once and passes it to [`ControlNetModel::forward_embedded`] at every step.
    pub fn embed_condition(&self, image: &Tensor) -> Result<Tensor, ControlNetError> {
        let image = match self.config.controlnet_conditioning_channel_order.as_str() {
            "bgr" => {
                let c = image.dim(1)?;
                let flipped: Vec<Tensor> =
                    (0..c).rev().map(|i| image.narrow(1, i, 1)).collect::<candle_core::Result<_>>()?;
                Tensor::cat(&flipped, 1)?
            }
            _ => image.clone(),
        };
        // The bias's dtype: f32 also when the weights are stored in f16 (`cpu::set_weight_dtype`).
        let dtype = self.conv_in.bias().unwrap_or(self.conv_in.weight()).dtype();
        Ok(self.controlnet_cond_embedding.forward(&image.to_dtype(dtype)?)?)
    }

    /// The residuals for `sample` `[B, C, h, w]` at `timesteps` (one per sample, or one for the
    /// batch) given the text `encoder_hidden_states` and the conditioning image, unscaled
    /// (diffusers' `conditioning_scale` 1, no guess mode).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        controlnet_cond: &Tensor,
        cond: &UNetConditioning,
    ) -> Result<Residuals, ControlNetError> {
        let hint = self.embed_condition(controlnet_cond)?;
        self.forward_embedded(sample, timesteps, encoder_hidden_states, &hint, cond)
    }

    /// [`ControlNetModel::forward`] with the conditioning image already encoded by
    /// [`ControlNetModel::embed_condition`] (batched like `sample`).
    pub fn forward_embedded(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        hint: &Tensor,
        cond: &UNetConditioning,
    ) -> Result<Residuals, ControlNetError> {
        let invalid = |field: &'static str, reason: String| ControlNetError::InvalidInput { field, reason };
        let (batch, channels, height, width) =
            sample.dims4().map_err(|_| invalid("sample", format!("expected [B, C, H, W], got {:?}", sample.dims())))?;
        if channels != self.config.in_channels {
            return Err(invalid("sample", format!("expected {} channels, got {channels}", self.config.in_channels)));
        }
        if hint.dims() != [batch, self.config.block_out_channels[0], height, width] {
            return Err(invalid(
                "controlnet_cond",
                format!(
                    "encodes to {:?}, expected {:?} (the image must be 8× the latent size, batched like the sample)",
                    hint.dims(),
                    [batch, self.config.block_out_channels[0], height, width]
                ),
            ));
        }
        let dtype = sample.dtype();
        let timesteps = match timesteps.elem_count() {
            1 => timesteps.flatten_all()?.broadcast_as(batch)?.contiguous()?,
            n if n == batch => timesteps.flatten_all()?,
            n => return Err(invalid("timesteps", format!("expected 1 or {batch} values, got {n}"))),
        };
        let cfg = &self.config;
        let ch0 = cfg.block_out_channels[0];
        let t_emb = timestep_embedding(&timesteps, ch0, cfg.flip_sin_to_cos, cfg.freq_shift)?.to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb, None)?;
        if let Some(add) = &self.add_embedding {
            let (Some(text_embeds), Some(time_ids)) = (cond.text_embeds, cond.time_ids) else {
                return Err(invalid("text_embeds", "an SDXL ControlNet needs text_embeds and time_ids".into()));
            };
            let dim = cfg.addition_time_embed_dim.unwrap_or_default();
            let time_embeds = timestep_embedding(&time_ids.flatten_all()?, dim, cfg.flip_sin_to_cos, cfg.freq_shift)?
                .reshape((text_embeds.dim(0)?, ()))?;
            let add_embeds = Tensor::cat(&[text_embeds.to_dtype(DType::F32)?, time_embeds], 1)?.to_dtype(dtype)?;
            emb = (emb + add.forward(&add_embeds, None)?)?;
        }

        let mut x = (self.conv_in.forward(sample)? + hint.to_dtype(dtype)?)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&x, Some(&emb), encoder_hidden_states)?;
            x = out;
            skips.extend(states);
        }
        let x = self.mid_block.forward(&x, Some(&emb), encoder_hidden_states)?;
        let down = skips
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, conv)| conv.forward(s))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Residuals { down, mid: self.controlnet_mid_block.forward(&x)? })
    }
}

impl VisitLayers for ControlNetModel {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.conv_in.visit_layers(f);
        self.time_embedding.visit_layers(f);
        self.add_embedding.visit_layers(f);
        self.controlnet_cond_embedding.visit_layers(f);
        self.down_blocks.visit_layers(f);
        self.controlnet_down_blocks.visit_layers(f);
        self.mid_block.visit_layers(f);
        self.controlnet_mid_block.visit_layers(f);
    }
}
