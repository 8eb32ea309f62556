//! Single-file checkpoints in the original LDM / SGM layout (`model.diffusion_model.*`,
//! `first_stage_model.*`), as users download them: family detection, configs inferred from
//! key names and shapes, and the diffusers ↔ LDM key mapping (the inverse direction of diffusers'
//! `single_file_utils`, applied lazily at lookup time).
//!
//! Text encoders are found under the prefixes diffusers knows (`cond_stage_model.transformer.`,
//! `conditioner.embedders.N.` ...), with transformers' names or OpenCLIP's fused ones.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::clip::{self, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection};
use crate::error::{DiffusionError, Result};
use crate::unet_2d_condition::{PerBlock, UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::weights::Weights;

/// The model family a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD1.x: 8 heads everywhere, 1×1-conv projections, CLIP-L text encoder.
    Sd1,
    /// SD2.x: 64-wide heads, linear projections, OpenCLIP ViT-H text encoder.
    Sd2,
    /// SDXL base: `label_emb` (text_time conditioning), CLIP-L + OpenCLIP bigG.
    Sdxl,
    /// SDXL refiner: bigG only.
    SdxlRefiner,
}

/// A single-file checkpoint.
#[derive(Debug, Clone)]
pub struct SingleFile {
    weights: Arc<Weights>,
}

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIXES: [&str; 3] = ["first_stage_model.", "vae.", ""];

impl SingleFile {
    /// Opens `.safetensors` (memory-mapped) or `.ckpt` / `.pth` (zip pickle).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self { weights: Arc::new(Weights::open(path)?) })
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    fn unknown(&self, message: impl Into<String>) -> DiffusionError {
        DiffusionError::UnknownArchitecture { path: self.weights.path().to_path_buf(), message: message.into() }
    }

    /// The prefix of the UNet keys (`model.diffusion_model.`, or empty for a bare UNet file).
    fn unet_prefix(&self) -> Result<&'static str> {
        [UNET_PREFIX, ""]
            .into_iter()
            .find(|p| self.weights.contains(&format!("{p}input_blocks.0.0.weight")))
            .ok_or_else(|| self.unknown("no UNet found (no `model.diffusion_model.input_blocks.0.0.weight`)"))
    }

    /// The prefix of the VAE keys (`first_stage_model.`, `vae.`, or empty for a VAE file).
    fn vae_prefix(&self) -> Result<&'static str> {
        VAE_PREFIXES
            .into_iter()
            .find(|p| self.weights.contains(&format!("{p}encoder.conv_in.weight")))
            .ok_or_else(|| self.unknown("no VAE found (no `first_stage_model.encoder.conv_in.weight`)"))
    }

    fn dims(&self, key: &str) -> Result<&[usize]> {
        self.weights.shape(key).ok_or_else(|| self.unknown(format!("missing key {key}")))
    }

    /// Detects the family from the text-encoder keys, or else from the UNet's shapes.
    pub fn family(&self) -> Result<ModelFamily> {
        let has = |k: &str| self.weights.contains(k);
        if has("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias") {
            return Ok(ModelFamily::Sdxl);
        }
        if has("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias") {
            return Ok(ModelFamily::SdxlRefiner);
        }
        let p = self.unet_prefix()?;
        if has(&format!("{p}label_emb.0.0.weight")) {
            return Ok(ModelFamily::Sdxl);
        }
        let first_attn =
            self.weights.shapes().iter().find(|(k, _)| k.starts_with(p) && k.ends_with(".1.proj_in.weight"));
        let linear = first_attn.is_some_and(|(_, s)| s.len() == 2);
        let ctx_1024 = self
            .weights
            .shapes()
            .iter()
            .any(|(k, s)| k.starts_with(p) && k.ends_with("attn2.to_k.weight") && s.get(1) == Some(&1024));
        Ok(if linear || ctx_1024 { ModelFamily::Sd2 } else { ModelFamily::Sd1 })
    }

    /// Whether the UNet takes the 9-channel inpainting input.
    pub fn is_inpainting(&self) -> Result<bool> {
        let p = self.unet_prefix()?;
        Ok(self.dims(&format!("{p}input_blocks.0.0.weight"))?.get(1) == Some(&9))
    }

    /// The diffusers UNet config of this checkpoint, read off its keys and shapes. Head counts
    /// follow the family (8 heads for SD1, 64-wide heads otherwise) and SDXL's time-id
    /// embedding is 256 wide, as in every released model; pass your own config to
    /// [`SingleFile::load_unet`] for anything else.
    pub fn unet_config(&self) -> Result<UNet2DConditionModelConfig> {
        let p = self.unet_prefix()?;
        let family = self.family()?;
        let has = |k: String| self.weights.contains(&k);
        let conv_in = self.dims(&format!("{p}input_blocks.0.0.weight"))?.to_vec();
        let ch0 = conv_in[0];

        // Levels of the encoder: resnets (with or without attention) until a downsampler.
        struct Level {
            channels: usize,
            layers: usize,
            depth: Option<usize>,
        }
        let mut levels: Vec<Level> = vec![];
        let mut current = Level { channels: ch0, layers: 0, depth: None };
        let mut k = 1;
        loop {
            if has(format!("{p}input_blocks.{k}.0.op.weight")) {
                levels.push(std::mem::replace(&mut current, Level { channels: 0, layers: 0, depth: None }));
            } else if let Some(s) = self.weights.shape(&format!("{p}input_blocks.{k}.0.in_layers.2.weight")) {
                current.channels = s[0];
                current.layers += 1;
                current.depth = self.transformer_depth(&format!("{p}input_blocks.{k}.1."));
            } else {
                break;
            }
            k += 1;
        }
        if current.layers == 0 {
            return Err(self.unknown(format!("UNet input block {k} is neither a resnet nor a downsampler")));
        }
        levels.push(current);
        let n = levels.len();
        let mid_depth = self.transformer_depth(&format!("{p}middle_block.1."));

        // Up blocks: attention presence read from the decoder side.
        let mut up_attn = vec![];
        let mut idx = 0;
        for level in levels.iter().rev() {
            up_attn.push(self.weights.contains(&format!("{p}output_blocks.{idx}.1.proj_in.weight")));
            idx += level.layers + 1;
        }
        if !has(format!("{p}output_blocks.{}.0.in_layers.2.weight", idx - 1)) {
            return Err(self.unknown(format!("expected {idx} UNet output blocks")));
        }

        let attn_key = self
            .weights
            .shapes()
            .keys()
            .filter(|k| k.starts_with(p) && k.ends_with("attn2.to_k.weight"))
            .min()
            .cloned()
            .ok_or_else(|| self.unknown("no cross-attention layer found"))?;
        let cross_attention_dim = self.dims(&attn_key)?[1];
        let proj_key = attn_key.replace("transformer_blocks.0.attn2.to_k.weight", "proj_in.weight");
        let use_linear_projection = self.weights.shape(&proj_key).is_some_and(|s| s.len() == 2);

        let channels: Vec<usize> = levels.iter().map(|l| l.channels).collect();
        let depths: Vec<usize> = levels
            .iter()
            .enumerate()
            .map(|(i, l)| l.depth.unwrap_or(if i + 1 == n { mid_depth.unwrap_or(1) } else { 1 }))
            .collect();
        let compact =
            |v: Vec<usize>| if v.windows(2).all(|w| w[0] == w[1]) { PerBlock::All(v[0]) } else { PerBlock::Each(v) };
        let attention_head_dim = match family {
            ModelFamily::Sd1 => PerBlock::All(8),
            _ => PerBlock::Each(channels.iter().map(|c| (c / 64).max(1)).collect()),
        };
        let mut cfg = UNet2DConditionModelConfig {
            sample_size: Some(match family {
                ModelFamily::Sd1 => 64,
                ModelFamily::Sd2 => 96,
                ModelFamily::Sdxl | ModelFamily::SdxlRefiner => 128,
            }),
            in_channels: conv_in[1],
            out_channels: self.dims(&format!("{p}out.2.weight"))?[0],
            conv_in_kernel: conv_in[2],
            conv_out_kernel: self.dims(&format!("{p}out.2.weight"))?[2],
            down_block_types: levels
                .iter()
                .map(|l| if l.depth.is_some() { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string())
                .collect(),
            up_block_types: up_attn
                .iter()
                .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
                .collect(),
            mid_block_type: mid_depth.map(|_| "UNetMidBlock2DCrossAttn".to_string()),
            block_out_channels: channels,
            layers_per_block: compact(levels.iter().map(|l| l.layers).collect()),
            transformer_layers_per_block: compact(depths),
            cross_attention_dim: PerBlock::All(cross_attention_dim),
            attention_head_dim,
            use_linear_projection,
            upcast_attention: family == ModelFamily::Sd2,
            ..Default::default()
        };
        let temb = self.dims(&format!("{p}time_embed.0.weight"))?[0];
        if temb != 4 * ch0 {
            cfg.time_embedding_dim = Some(temb);
        }
        if let Some(s) = self.weights.shape(&format!("{p}label_emb.0.0.weight")) {
            cfg.addition_embed_type = Some("text_time".into());
            cfg.addition_time_embed_dim = Some(256);
            cfg.projection_class_embeddings_input_dim = Some(s[1]);
        }
        Ok(cfg)
    }

    /// The number of transformer blocks under `prefix` (`None` when there is no attention).
    fn transformer_depth(&self, prefix: &str) -> Option<usize> {
        let p = format!("{prefix}transformer_blocks.");
        self.weights
            .shapes()
            .keys()
            .filter_map(|k| k.strip_prefix(&p)?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map(|m| m + 1)
    }

    /// The diffusers VAE config of this checkpoint. The scaling factor follows the family
    /// (0.13025 for SDXL, else 0.18215): a standalone SDXL VAE file has the same keys and shapes
    /// as an SD one, so set it yourself there.
    pub fn vae_config(&self) -> Result<AutoencoderKLConfig> {
        let p = self.vae_prefix()?;
        let mut block_out_channels = vec![];
        while let Some(s) =
            self.weights.shape(&format!("{p}encoder.down.{}.block.0.conv1.weight", block_out_channels.len()))
        {
            block_out_channels.push(s[0]);
        }
        if block_out_channels.is_empty() {
            return Err(self.unknown("VAE has no encoder.down.0 block"));
        }
        let n = block_out_channels.len();
        let mut layers = 0;
        while self.weights.contains(&format!("{p}encoder.down.0.block.{layers}.conv1.weight")) {
            layers += 1;
        }
        let sdxl = matches!(self.family(), Ok(ModelFamily::Sdxl | ModelFamily::SdxlRefiner));
        Ok(AutoencoderKLConfig {
            in_channels: self.dims(&format!("{p}encoder.conv_in.weight"))?[1],
            out_channels: self.dims(&format!("{p}decoder.conv_out.weight"))?[0],
            down_block_types: vec!["DownEncoderBlock2D".into(); n],
            up_block_types: vec!["UpDecoderBlock2D".into(); n],
            block_out_channels,
            layers_per_block: layers,
            latent_channels: self.dims(&format!("{p}decoder.conv_in.weight"))?[1],
            sample_size: if sdxl { 1024 } else { 512 },
            scaling_factor: if sdxl { 0.13025 } else { 0.18215 },
            use_quant_conv: self.weights.contains(&format!("{p}quant_conv.weight")),
            use_post_quant_conv: self.weights.contains(&format!("{p}post_quant_conv.weight")),
            mid_block_add_attention: self.weights.contains(&format!("{p}encoder.mid.attn_1.q.weight")),
            ..Default::default()
        })
    }

    /// Builds the UNet with `config` (from [`SingleFile::unet_config`] or your own).
    pub fn load_unet(
        &self,
        config: &UNet2DConditionModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<UNet2DConditionModel> {
        config.validate().map_err(|(f, m)| DiffusionError::config(self.weights.path(), f, m))?;
        let prefix = self.unet_prefix()?;
        let layout = UNetLayout::new(config);
        let (vb, report) =
            self.weights.var_builder(move |name| format!("{prefix}{}", layout.ldm_key(name)), dtype, device);
        let model = UNet2DConditionModel::new(vb, config)?;
        self.weights.check(&report)?;
        Ok(model)
    }

    /// Builds the VAE with `config` (from [`SingleFile::vae_config`] or your own).
    pub fn load_vae(&self, config: &AutoencoderKLConfig, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
        config.validate().map_err(|(f, m)| DiffusionError::config(self.weights.path(), f, m))?;
        let prefix = self.vae_prefix()?;
        let levels = config.block_out_channels.len();
        let (vb, report) =
            self.weights.var_builder(move |name| format!("{prefix}{}", vae_ldm_key(name, levels)), dtype, device);
        let model = AutoencoderKL::new(vb, config)?;
        self.weights.check(&report)?;
        Ok(model)
    }
}

/// Where each diffusers UNet block sits among the LDM `input_blocks` / `output_blocks`.
#[derive(Debug, Clone)]
struct UNetLayout {
    down_start: Vec<usize>,
    down_layers: Vec<usize>,
    up_start: Vec<usize>,
    up_layers: Vec<usize>,
    up_attention: Vec<bool>,
}

impl UNetLayout {
    fn new(cfg: &UNet2DConditionModelConfig) -> Self {
        let n = cfg.block_out_channels.len();
        let layers = cfg.layers_per_block.expand(n).unwrap_or_else(|| vec![0; n]);
        let (mut down_start, mut up_start, mut up_layers) = (vec![], vec![], vec![]);
        let mut k = 1;
        for (i, &l) in layers.iter().enumerate() {
            down_start.push(k);
            k += l + usize::from(i + 1 < n);
        }
        let mut k = 0;
        for &l in layers.iter().rev() {
            up_start.push(k);
            up_layers.push(l + 1);
            k += l + 1;
        }
        let up_attention = cfg.up_block_types.iter().map(|t| t.starts_with("CrossAttn")).collect();
        Self { down_start, down_layers: layers, up_start, up_layers, up_attention }
    }

    /// The LDM key (without prefix) of a diffusers UNet key.
    fn ldm_key(&self, name: &str) -> String {
        let parts: Vec<&str> = name.split('.').collect();
        let rest = |from: usize| parts.get(from..).map(|p| p.join(".")).unwrap_or_default();
        let idx = |i: usize| parts.get(i).and_then(|s| s.parse::<usize>().ok());
        let mapped = match parts.as_slice() {
            ["conv_in", ..] => Some(format!("input_blocks.0.0.{}", rest(1))),
            ["time_embedding", "linear_1", ..] => Some(format!("time_embed.0.{}", rest(2))),
            ["time_embedding", "linear_2", ..] => Some(format!("time_embed.2.{}", rest(2))),
            ["add_embedding", "linear_1", ..] => Some(format!("label_emb.0.0.{}", rest(2))),
            ["add_embedding", "linear_2", ..] => Some(format!("label_emb.0.2.{}", rest(2))),
            ["conv_norm_out", ..] => Some(format!("out.0.{}", rest(1))),
            ["conv_out", ..] => Some(format!("out.2.{}", rest(1))),
            ["down_blocks", _, kind, ..] => idx(1).zip(idx(3)).and_then(|(i, j)| {
                let start = *self.down_start.get(i)?;
                Some(match *kind {
                    "resnets" => format!("input_blocks.{}.0.{}", start + j, resnet_ldm(&rest(4))),
                    "attentions" => format!("input_blocks.{}.1.{}", start + j, rest(4)),
                    "downsamplers" => format!("input_blocks.{}.0.op.{}", start + self.down_layers[i], rest(5)),
                    _ => return None,
                })
            }),
            ["mid_block", "resnets", "0", ..] => Some(format!("middle_block.0.{}", resnet_ldm(&rest(3)))),
            ["mid_block", "attentions", "0", ..] => Some(format!("middle_block.1.{}", rest(3))),
            ["mid_block", "resnets", "1", ..] => Some(format!("middle_block.2.{}", resnet_ldm(&rest(3)))),
            ["up_blocks", _, kind, ..] => idx(1).zip(idx(3)).and_then(|(i, j)| {
                let start = *self.up_start.get(i)?;
                Some(match *kind {
                    "resnets" => format!("output_blocks.{}.0.{}", start + j, resnet_ldm(&rest(4))),
                    "attentions" => format!("output_blocks.{}.1.{}", start + j, rest(4)),
                    "upsamplers" => {
                        let slot = if self.up_attention.get(i) == Some(&true) { 2 } else { 1 };
                        format!("output_blocks.{}.{slot}.{}", start + self.up_layers[i] - 1, rest(4))
                    }
                    _ => return None,
                })
            }),
            _ => None,
        };
        mapped.unwrap_or_else(|| name.to_string())
    }
}

/// diffusers `ResnetBlock2D` member names (`norm1.weight`…) to the LDM `ResBlock` ones
/// (`in_layers.0.weight`…), for every checkpoint in the original layout.
pub fn resnet_ldm(rest: &str) -> String {
    let (head, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let head = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        other => other,
    };
    format!("{head}.{tail}")
}

/// The LDM key (without prefix) of a diffusers VAE key, for a VAE with `levels` resolutions.
fn vae_ldm_key(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let rest = |from: usize| parts.get(from..).map(|p| p.join(".")).unwrap_or_default();
    let resnet = |r: String| r.replacen("conv_shortcut", "nin_shortcut", 1);
    let attn = |r: &str| match r.split_once('.') {
        Some(("group_norm", t)) => format!("norm.{t}"),
        Some(("to_q", t)) => format!("q.{t}"),
        Some(("to_k", t)) => format!("k.{t}"),
        Some(("to_v", t)) => format!("v.{t}"),
        Some(("to_out", t)) => format!("proj_out.{}", t.trim_start_matches("0.")),
        _ => r.to_string(),
    };
    let mapped = match parts.as_slice() {
        [side, "down_blocks", i, "resnets", j, ..] => Some(format!("{side}.down.{i}.block.{j}.{}", resnet(rest(5)))),
        [side, "down_blocks", i, "downsamplers", "0", ..] => Some(format!("{side}.down.{i}.downsample.{}", rest(5))),
        [side, "up_blocks", i, kind, ..] => i.parse::<usize>().ok().filter(|&i| i < levels).and_then(|i| {
            let level = levels - 1 - i;
            match *kind {
                "resnets" => Some(format!("{side}.up.{level}.block.{}.{}", parts.get(4)?, resnet(rest(5)))),
                "upsamplers" => Some(format!("{side}.up.{level}.upsample.{}", rest(5))),
                _ => None,
            }
        }),
        [side, "mid_block", "resnets", j, ..] => {
            j.parse::<usize>().ok().map(|j| format!("{side}.mid.block_{}.{}", j + 1, resnet(rest(4))))
        }
        [side, "mid_block", "attentions", "0", ..] => Some(format!("{side}.mid.attn_1.{}", attn(&rest(4)))),
        [side, "conv_norm_out", ..] => Some(format!("{side}.norm_out.{}", rest(2))),
        _ => None,
    };
    mapped.unwrap_or_else(|| name.to_string())
}

/// A text encoder of a single-file checkpoint, named after its diffusers pipeline component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderSlot {
    /// `text_encoder`: CLIP ViT-L (SD1.x, SDXL base) or OpenCLIP ViT-H (SD2.x).
    TextEncoder,
    /// `text_encoder_2`: OpenCLIP ViT-bigG (SDXL base and refiner).
    TextEncoder2,
}

impl TextEncoderSlot {
    fn component(self) -> &'static str {
        match self {
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// Where a text encoder is stored: under `prefix`, with transformers' names or OpenCLIP's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClipSource {
    prefix: &'static str,
    open_clip: bool,
}

/// The places diffusers' `create_diffusers_clip_model_from_ldm` looks, per slot.
const CLIP_SOURCES: [(TextEncoderSlot, ClipSource); 5] = [
    (TextEncoderSlot::TextEncoder, ClipSource { prefix: "cond_stage_model.transformer.", open_clip: false }),
    (TextEncoderSlot::TextEncoder, ClipSource { prefix: "conditioner.embedders.0.transformer.", open_clip: false }),
    (TextEncoderSlot::TextEncoder, ClipSource { prefix: SD2_OPEN_CLIP_PREFIX, open_clip: true }),
    (TextEncoderSlot::TextEncoder2, ClipSource { prefix: "conditioner.embedders.1.model.", open_clip: true }),
    (TextEncoderSlot::TextEncoder2, ClipSource { prefix: "conditioner.embedders.0.model.", open_clip: true }),
];

/// SD2's OpenCLIP ViT-H, whose last layer the diffusers text encoder leaves out.
const SD2_OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// How a tensor requested by its transformers name is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stored {
    Plain(String),
    /// Transposed (OpenCLIP's `text_projection`, applied as `x @ P`).
    Transposed(String),
    /// Third `chunk` (0: q, 1: k, 2: v) along dim 0 of a fused `in_proj_weight` / `in_proj_bias`.
    Fused {
        key: String,
        chunk: usize,
    },
}

impl Stored {
    fn key(&self) -> &str {
        match self {
            Self::Plain(k) | Self::Transposed(k) | Self::Fused { key: k, .. } => k,
        }
    }

    /// The stored shape of a tensor of (transformers) shape `dims`.
    fn stored_dims(&self, dims: &[usize]) -> Vec<usize> {
        let mut dims = dims.to_vec();
        match self {
            Self::Plain(_) => {}
            Self::Transposed(_) => dims.reverse(),
            Self::Fused { .. } => dims.iter_mut().take(1).for_each(|d| *d *= 3),
        }
        dims
    }

    /// The transformers shape of a tensor stored with shape `dims` (the inverse of `stored_dims`).
    fn model_dims(&self, dims: &[usize]) -> Vec<usize> {
        let mut dims = dims.to_vec();
        match self {
            Self::Plain(_) => {}
            Self::Transposed(_) => dims.reverse(),
            Self::Fused { .. } => dims.iter_mut().take(1).for_each(|d| *d /= 3),
        }
        dims
    }
}

/// The OpenCLIP name of a transformers CLIP text-encoder tensor (both without prefix).
fn open_clip_name(name: &str) -> Stored {
    let plain = Stored::Plain;
    match name {
        "text_model.embeddings.token_embedding.weight" => return plain("token_embedding.weight".into()),
        "text_model.embeddings.position_embedding.weight" => return plain("positional_embedding".into()),
        "text_projection.weight" => return Stored::Transposed("text_projection".into()),
        _ => {}
    }
    if let Some(param) = name.strip_prefix("text_model.final_layer_norm.") {
        return plain(format!("ln_final.{param}"));
    }
    let layer = name.strip_prefix("text_model.encoder.layers.").and_then(|rest| {
        let (index, member) = rest.split_once('.')?;
        let (module, param) = member.rsplit_once('.')?;
        let block = format!("transformer.resblocks.{index}.");
        Some(match module {
            "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => Stored::Fused {
                key: format!("{block}attn.in_proj_{param}"),
                chunk: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
                    .iter()
                    .position(|m| *m == module)?,
            },
            "self_attn.out_proj" => plain(format!("{block}attn.out_proj.{param}")),
            "layer_norm1" => plain(format!("{block}ln_1.{param}")),
            "layer_norm2" => plain(format!("{block}ln_2.{param}")),
            "mlp.fc1" => plain(format!("{block}mlp.c_fc.{param}")),
            "mlp.fc2" => plain(format!("{block}mlp.c_proj.{param}")),
            _ => return None,
        })
    });
    layer.unwrap_or_else(|| plain(name.to_string()))
}

impl ClipSource {
    /// Where the transformers tensor `name` is stored in `weights`.
    fn stored(&self, name: &str, weights: &Weights) -> Stored {
        if !self.open_clip {
            return Stored::Plain(clip::stored_key(|k| weights.contains(k), self.prefix, name));
        }
        match open_clip_name(name) {
            Stored::Plain(k) => Stored::Plain(format!("{}{k}", self.prefix)),
            Stored::Transposed(k) => Stored::Transposed(format!("{}{k}", self.prefix)),
            Stored::Fused { key, chunk } => Stored::Fused { key: format!("{}{key}", self.prefix), chunk },
        }
    }

    /// The transformers shape of the stored tensor `name`, if stored.
    fn dims(&self, name: &str, weights: &Weights) -> Option<Vec<usize>> {
        let stored = self.stored(name, weights);
        weights.shape(stored.key()).map(|dims| stored.model_dims(dims))
    }
}

/// A `VarBuilder` backend that maps transformers names to a [`ClipSource`]'s tensors, slicing
/// fused q/k/v and transposing where needed. Lookups go through a [`Weights`] `VarBuilder`, so
/// missing keys and wrong shapes are reported under their stored names and shapes (a fused
/// tensor once, as it is loaded once for its three parts).
struct ClipBackend {
    source: ClipSource,
    weights: Arc<Weights>,
    inner: VarBuilder<'static>,
    fused: Mutex<HashMap<String, Tensor>>,
}

impl ClipBackend {
    fn fused(&self, key: &str, load: impl FnOnce() -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        let mut cache = self.fused.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
        if let Some(t) = cache.get(key) {
            return Ok(t.clone());
        }
        let t = load()?;
        cache.insert(key.to_string(), t.clone());
        Ok(t)
    }
}

impl SimpleBackend for ClipBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        _: &Device,
    ) -> candle_core::Result<Tensor> {
        let stored = self.source.stored(name, &self.weights);
        let dims = stored.stored_dims(shape.dims());
        match &stored {
            Stored::Plain(key) => self.inner.get_with_hints_dtype(dims, key, init, dtype),
            Stored::Transposed(key) => self.inner.get_with_hints_dtype(dims, key, init, dtype)?.t()?.contiguous(),
            Stored::Fused { key, chunk } => {
                let full = self.fused(key, || self.inner.get_with_hints_dtype(dims, key, init, dtype))?;
                let n = full.dim(0)? / 3;
                full.narrow(0, chunk * n, n)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        let stored = self.source.stored(name, &self.weights);
        let t = self.inner.get_unchecked_dtype(stored.key(), dtype)?;
        match stored {
            Stored::Plain(_) => Ok(t),
            Stored::Transposed(_) => t.t()?.contiguous(),
            Stored::Fused { chunk, .. } => t.chunk(3, 0)?.swap_remove(chunk).contiguous(),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains(self.source.stored(name, &self.weights).key())
    }
}

/// Text encoders: detection, configs read off the shapes, loading (the inverse of diffusers'
/// `convert_ldm_clip_checkpoint` / `convert_open_clip_checkpoint`).
impl SingleFile {
    /// The text encoders this checkpoint holds.
    pub fn text_encoders(&self) -> Vec<TextEncoderSlot> {
        [TextEncoderSlot::TextEncoder, TextEncoderSlot::TextEncoder2]
            .into_iter()
            .filter(|&slot| self.clip_source(slot).is_ok())
            .collect()
    }

    fn clip_source(&self, slot: TextEncoderSlot) -> Result<ClipSource> {
        let sources = CLIP_SOURCES.iter().filter(|(s, _)| *s == slot).map(|&(_, source)| source);
        sources
            .clone()
            .find(|source| source.dims("text_model.embeddings.token_embedding.weight", &self.weights).is_some())
            .ok_or_else(|| {
                let prefixes: Vec<_> = sources.map(|s| s.prefix).collect();
                self.unknown(format!("no {} (no token embedding under {})", slot.component(), prefixes.join(", ")))
            })
    }

    /// The transformers config of a text encoder, read off its shapes: 64-wide heads, and the
    /// activation and token ids of the released models (`quick_gelu` for CLIP-L, `gelu` for
    /// OpenCLIP; `eos_token_id` 2, pooling at the highest id). SD2's encoder has one layer fewer
    /// than stored, as in diffusers (SD2 conditions on the penultimate layer).
    pub fn text_encoder_config(&self, slot: TextEncoderSlot) -> Result<CLIPTextConfig> {
        let source = self.clip_source(slot)?;
        let (slot, prefix) = (slot.component(), source.prefix);
        let dims = |name: &str| {
            source.dims(name, &self.weights).ok_or_else(|| self.unknown(format!("{slot} under {prefix}: no {name}")))
        };
        let token = dims("text_model.embeddings.token_embedding.weight")?;
        let positions = dims("text_model.embeddings.position_embedding.weight")?;
        let stored_layers = (0..)
            .take_while(|i| {
                source.dims(&format!("text_model.encoder.layers.{i}.layer_norm1.weight"), &self.weights).is_some()
            })
            .count();
        let drop_last = usize::from(source.prefix == SD2_OPEN_CLIP_PREFIX);
        if stored_layers <= drop_last || token.len() != 2 || positions.len() != 2 {
            return Err(self.unknown(format!("{slot} under {prefix}: no encoder layers")));
        }
        let hidden_size = token[1];
        let projection_dim = source.dims("text_projection.weight", &self.weights).map_or(hidden_size, |d| d[0]);
        Ok(CLIPTextConfig {
            vocab_size: token[0],
            hidden_size,
            intermediate_size: dims("text_model.encoder.layers.0.mlp.fc1.weight")?[0],
            projection_dim: Some(projection_dim),
            num_hidden_layers: stored_layers - drop_last,
            num_attention_heads: (hidden_size / 64).max(1),
            max_position_embeddings: positions[0],
            hidden_act: if source.open_clip { "gelu" } else { "quick_gelu" }.into(),
            layer_norm_eps: 1e-5,
            bos_token_id: Some(0),
            eos_token_id: Some(2),
            pad_token_id: Some(1),
        })
    }

    /// Builds a text encoder with `config` (from [`SingleFile::text_encoder_config`] or your own).
    pub fn load_text_encoder(
        &self,
        slot: TextEncoderSlot,
        config: &CLIPTextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<CLIPTextModel> {
        self.build_text_encoder(slot, config, dtype, device, CLIPTextModel::new)
    }

    /// Builds a text encoder and its `text_projection` (SDXL's `text_encoder_2`).
    pub fn load_text_encoder_with_projection(
        &self,
        slot: TextEncoderSlot,
        config: &CLIPTextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<CLIPTextModelWithProjection> {
        self.build_text_encoder(slot, config, dtype, device, CLIPTextModelWithProjection::new)
    }

    fn build_text_encoder<M>(
        &self,
        slot: TextEncoderSlot,
        config: &CLIPTextConfig,
        dtype: DType,
        device: &Device,
        new: impl FnOnce(VarBuilder, &CLIPTextConfig) -> Result<M>,
    ) -> Result<M> {
        config.validate().map_err(|(f, m)| DiffusionError::config(self.weights.path(), f, m))?;
        let source = self.clip_source(slot)?;
        let (inner, report) = self.weights.var_builder(str::to_string, dtype, device);
        let backend = ClipBackend { source, weights: self.weights.clone(), inner, fused: Mutex::new(HashMap::new()) };
        let model = new(VarBuilder::from_backend(Box::new(backend), dtype, device.clone()), config)?;
        self.weights.check(&report)?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_unet_keys_map_to_ldm_names() {
        let layout = UNetLayout::new(&UNet2DConditionModelConfig::default());
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
            ),
            ("down_blocks.1.resnets.1.time_emb_proj.bias", "input_blocks.5.0.emb_layers.1.bias"),
            ("down_blocks.2.downsamplers.0.conv.weight", "input_blocks.9.0.op.weight"),
            ("down_blocks.3.resnets.1.conv2.weight", "input_blocks.11.0.out_layers.3.weight"),
            ("mid_block.attentions.0.proj_in.weight", "middle_block.1.proj_in.weight"),
            ("mid_block.resnets.1.norm1.weight", "middle_block.2.in_layers.0.weight"),
            ("up_blocks.0.resnets.2.conv_shortcut.weight", "output_blocks.2.0.skip_connection.weight"),
            ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
            ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
            ("up_blocks.3.attentions.2.proj_out.weight", "output_blocks.11.1.proj_out.weight"),
            ("time_embedding.linear_2.weight", "time_embed.2.weight"),
            ("conv_norm_out.bias", "out.0.bias"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(layout.ldm_key(diffusers), ldm, "{diffusers}");
        }
    }

    #[test]
    fn vae_keys_map_to_ldm_names() {
        let cases = [
            ("encoder.down_blocks.0.resnets.1.conv1.weight", "encoder.down.0.block.1.conv1.weight"),
            ("encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"),
            ("decoder.up_blocks.0.resnets.2.conv_shortcut.weight", "decoder.up.3.block.2.nin_shortcut.weight"),
            ("decoder.up_blocks.1.upsamplers.0.conv.weight", "decoder.up.2.upsample.conv.weight"),
            ("encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
            ("decoder.mid_block.attentions.0.group_norm.bias", "decoder.mid.attn_1.norm.bias"),
            ("decoder.mid_block.resnets.1.norm2.weight", "decoder.mid.block_2.norm2.weight"),
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            ("quant_conv.weight", "quant_conv.weight"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(vae_ldm_key(diffusers, 4), ldm, "{diffusers}");
        }
    }

    #[test]
    fn clip_keys_map_to_open_clip_names() {
        let plain = |k: &str| Stored::Plain(k.to_string());
        let cases = [
            ("text_model.embeddings.position_embedding.weight", plain("positional_embedding")),
            ("text_model.final_layer_norm.bias", plain("ln_final.bias")),
            ("text_projection.weight", Stored::Transposed("text_projection".into())),
            (
                "text_model.encoder.layers.11.self_attn.k_proj.weight",
                Stored::Fused { key: "transformer.resblocks.11.attn.in_proj_weight".into(), chunk: 1 },
            ),
            (
                "text_model.encoder.layers.0.self_attn.v_proj.bias",
                Stored::Fused { key: "transformer.resblocks.0.attn.in_proj_bias".into(), chunk: 2 },
            ),
            (
                "text_model.encoder.layers.3.self_attn.out_proj.bias",
                plain("transformer.resblocks.3.attn.out_proj.bias"),
            ),
            ("text_model.encoder.layers.2.layer_norm2.weight", plain("transformer.resblocks.2.ln_2.weight")),
            ("text_model.encoder.layers.0.mlp.fc1.weight", plain("transformer.resblocks.0.mlp.c_fc.weight")),
            ("text_model.encoder.layers.0.mlp.fc2.bias", plain("transformer.resblocks.0.mlp.c_proj.bias")),
        ];
        for (hf, open_clip) in cases {
            assert_eq!(open_clip_name(hf), open_clip, "{hf}");
        }
    }
}
