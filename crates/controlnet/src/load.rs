//! Loading ControlNets as users download them: the original lllyasviel `.pth` / `.safetensors`
//! files (keys with or without `control_model.`; config read off the keys and shapes) and
//! diffusers folders (`config.json` beside `diffusion_pytorch_model[.fp16].safetensors`). Missing
//! keys and wrong shapes are reported all at once, naming the file, by the diffusion crate's
//! weight machinery.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use easyphoto_diffusion::DiffusionError;
use easyphoto_diffusion::diffusers_folder::{open_weights, read_config};
use easyphoto_diffusion::unet_2d_condition::PerBlock;
use easyphoto_diffusion::weights::Weights;

use crate::original_keys::{ORIGINAL_PREFIX, diffusers_key_to_original};
use crate::{ControlNetConfig, ControlNetError, ControlNetModel, DIFFUSERS_PREFIX};

/// Loads a ControlNet from a diffusers folder, an original-layout `.pth` / `.ckpt` /
/// `.safetensors` file, or a diffusers-layout single file (which needs `config`). `config`
/// overrides the folder's `config.json` or the config inferred from an original file.
pub fn load_controlnet(
    path: &Path,
    config: Option<&ControlNetConfig>,
    dtype: DType,
    device: &Device,
) -> Result<ControlNetModel, ControlNetError> {
    if path.is_dir() {
        let config_path = path.join("config.json");
        let config = match config {
            Some(c) => c.clone(),
            None => read_config(&config_path)?,
        };
        // The plain weights, else the `.fp16` variant; the error names the plain file.
        let weights = open_weights(path, None).or_else(|e| open_weights(path, Some("fp16")).map_err(|_| e))?;
        return build(Arc::new(weights), &config, &config_path, |name| name.to_string(), dtype, device);
    }
    let weights = Arc::new(Weights::open(path)?);
    if weights.contains(&format!("{DIFFUSERS_PREFIX}.conv_in.weight")) {
        let Some(config) = config else {
            return Err(config_error(path, "config", "a diffusers-layout file needs its config.json"));
        };
        return build(weights, config, path, |name| name.to_string(), dtype, device);
    }
    let prefix = [ORIGINAL_PREFIX, ""]
        .into_iter()
        .find(|p| weights.contains(&format!("{p}input_hint_block.0.weight")))
        .ok_or_else(|| DiffusionError::UnknownArchitecture {
            path: path.to_path_buf(),
            message: "no ControlNet found (no `control_model.input_hint_block.0.weight` or \
                      `controlnet_cond_embedding.conv_in.weight`)"
                .into(),
        })?;
    let config = match config {
        Some(c) => c.clone(),
        None => infer_original_config(&weights, prefix)?,
    };
    let (layers, hint) = (config.layers_per_block, config.conditioning_embedding());
    let rename = move |name: &str| format!("{prefix}{}", diffusers_key_to_original(name, layers, &hint));
    build(weights, &config, path, rename, dtype, device)
}

fn config_error(path: &Path, field: &str, message: impl Into<String>) -> ControlNetError {
    DiffusionError::Config { path: path.to_path_buf(), field: field.into(), message: message.into() }.into()
}

fn build(
    weights: Arc<Weights>,
    config: &ControlNetConfig,
    config_path: &Path,
    rename: impl Fn(&str) -> String + Send + Sync + 'static,
    dtype: DType,
    device: &Device,
) -> Result<ControlNetModel, ControlNetError> {
    config.validate().map_err(|(field, message)| config_error(config_path, field, message))?;
    let (vb, report) = weights.var_builder(rename, dtype, device);
    let model = ControlNetModel::new(vb, config)?;
    weights.check(&report)?;
    Ok(model)
}

/// The config of an original-layout ControlNet, read off its keys and shapes: levels, widths and
/// transformer depths from `input_blocks`, the hint encoder from `input_hint_block`, SDXL's
/// `text_time` conditioning from `label_emb`. Head counts follow the family, as in every released
/// model: 8 heads with CLIP-L's 768-wide context (SD 1.x), 64-wide heads otherwise.
pub fn infer_original_config(weights: &Weights, prefix: &str) -> Result<ControlNetConfig, ControlNetError> {
    let path = weights.path();
    let shape = |key: String| weights.shape(&format!("{prefix}{key}")).map(<[usize]>::to_vec);
    let unknown = |message: String| DiffusionError::UnknownArchitecture { path: path.to_path_buf(), message };
    let conv_in =
        shape("input_blocks.0.0.weight".into()).ok_or_else(|| unknown("no `input_blocks.0.0.weight`".into()))?;

    // Encoder levels until each downsampler: width, resnets, whether they have attention (a
    // transformer with zero blocks still has `proj_in`), transformer depth.
    struct Level {
        width: usize,
        resnets: usize,
        attention: bool,
        depth: usize,
    }
    let mut levels: Vec<Level> = vec![];
    let mut level = Level { width: conv_in[0], resnets: 0, attention: false, depth: 0 };
    for k in 1.. {
        let block = |s: &str| shape(format!("input_blocks.{k}.{s}"));
        if block("0.op.weight").is_some() {
            let width = level.width;
            levels.push(std::mem::replace(&mut level, Level { width, resnets: 0, attention: false, depth: 0 }));
        } else if let Some(conv) = block("0.in_layers.2.weight") {
            level.width = conv[0];
            level.resnets += 1;
            level.attention = block("1.proj_in.weight").is_some();
            level.depth =
                (0..).take_while(|d| block(&format!("1.transformer_blocks.{d}.norm1.weight")).is_some()).count();
        } else {
            levels.push(level);
            break;
        }
    }
    let layers_per_block = levels[0].resnets;
    if levels.iter().any(|l| l.resnets != layers_per_block) {
        let counts: Vec<usize> = levels.iter().map(|l| l.resnets).collect();
        return Err(unknown(format!("levels with different resnet counts: {counts:?}")).into());
    }
    let attention_key = weights
        .shapes()
        .iter()
        .filter(|(k, _)| k.starts_with(prefix) && k.contains("input_blocks.") && k.ends_with("attn2.to_k.weight"))
        .map(|(_, s)| s.clone())
        .next();
    let cross_attention_dim = attention_key.map_or(768, |s| s[1]);
    let use_linear_projection =
        weights.shapes().iter().any(|(k, s)| k.starts_with(prefix) && k.ends_with(".1.proj_in.weight") && s.len() == 2);
    let heads = |c: usize| if cross_attention_dim == 768 { 8 } else { (c / 64).max(1) };

    let hint_shape = |i: usize| shape(format!("input_hint_block.{i}.weight"));
    let hint_in = hint_shape(0).ok_or_else(|| unknown("no `input_hint_block.0.weight`".into()))?;
    let convs = (0..).take_while(|&i| hint_shape(2 * i).is_some()).count();
    // conv_in, then (same-size conv, stride-2 conv) pairs, then conv_out.
    let mut hint_channels = vec![hint_in[0]];
    for pair in 0..convs.saturating_sub(2) / 2 {
        hint_channels.extend(hint_shape(2 * (2 * pair + 2)).map(|s| s[0]));
    }

    let label_emb = shape("label_emb.0.0.weight".into());
    let n = levels.len();
    Ok(ControlNetConfig {
        in_channels: conv_in[1],
        conditioning_channels: hint_in[1],
        down_block_types: levels
            .iter()
            .map(|l| if l.attention { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string())
            .collect(),
        block_out_channels: levels.iter().map(|l| l.width).collect(),
        layers_per_block,
        cross_attention_dim,
        transformer_layers_per_block: PerBlock::Each(
            levels.iter().map(|l| if l.attention { l.depth } else { 1 }).collect(),
        ),
        attention_head_dim: PerBlock::Each(levels.iter().map(|l| heads(l.width)).collect()),
        use_linear_projection,
        addition_embed_type: label_emb.as_ref().map(|_| "text_time".to_string()),
        addition_time_embed_dim: label_emb.as_ref().map(|_| 256),
        projection_class_embeddings_input_dim: label_emb.map(|s| s[1]),
        conditioning_embedding_out_channels: Some(hint_channels),
        only_cross_attention: PerBlock::Each(vec![false; n]),
        ..Default::default()
    })
}
