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
/// `.safetensors` file, or a diffusers-layout single file. `config` overrides the folder's
/// `config.json` or the config inferred from a single file's keys and shapes (whose head counts
/// follow the released models, see [`infer_original_config`]).
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
        let config = match config {
            Some(c) => c.clone(),
            None => infer_diffusers_config(&weights)?,
        };
        return build(weights, &config, path, |name| name.to_string(), dtype, device);
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

/// What the keys and shapes of a checkpoint say about its architecture.
struct Shapes {
    in_channels: usize,
    conditioning_channels: usize,
    levels: Vec<Level>,
    cross_attention_dim: usize,
    use_linear_projection: bool,
    hint_channels: Vec<usize>,
    /// SDXL: the input width of `add_embedding` (`text_time` conditioning).
    projection_dim: Option<usize>,
}

/// One encoder level: width, resnets, whether they have attention (a transformer with zero
/// blocks still has `proj_in`), transformer depth.
struct Level {
    width: usize,
    resnets: usize,
    attention: bool,
    depth: usize,
}

impl Shapes {
    /// The config, with the head counts of the family, as in every released model: 8 heads with
    /// CLIP-L's 768-wide context (SD 1.x), 64-wide heads otherwise; SDXL's 256-wide time ids.
    fn into_config(self, path: &Path) -> Result<ControlNetConfig, ControlNetError> {
        let layers_per_block = self.levels.first().map_or(0, |l| l.resnets);
        if layers_per_block == 0 || self.levels.iter().any(|l| l.resnets != layers_per_block) {
            let counts: Vec<usize> = self.levels.iter().map(|l| l.resnets).collect();
            return Err(DiffusionError::UnknownArchitecture {
                path: path.to_path_buf(),
                message: format!("encoder levels with resnet counts {counts:?}"),
            }
            .into());
        }
        let cross = self.cross_attention_dim;
        let heads = |c: usize| if cross == 768 { 8 } else { (c / 64).max(1) };
        let levels = &self.levels;
        Ok(ControlNetConfig {
            in_channels: self.in_channels,
            conditioning_channels: self.conditioning_channels,
            down_block_types: levels
                .iter()
                .map(|l| if l.attention { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string())
                .collect(),
            block_out_channels: levels.iter().map(|l| l.width).collect(),
            layers_per_block,
            cross_attention_dim: cross,
            transformer_layers_per_block: PerBlock::Each(levels.iter().map(|l| l.depth).collect()),
            attention_head_dim: PerBlock::Each(levels.iter().map(|l| heads(l.width)).collect()),
            use_linear_projection: self.use_linear_projection,
            addition_embed_type: self.projection_dim.map(|_| "text_time".to_string()),
            addition_time_embed_dim: self.projection_dim.map(|_| 256),
            projection_class_embeddings_input_dim: self.projection_dim,
            conditioning_embedding_out_channels: Some(self.hint_channels),
            only_cross_attention: PerBlock::Each(vec![false; levels.len()]),
            ..Default::default()
        })
    }
}

/// The context width (any cross-attention `to_k`, else CLIP-L's 768) and whether `proj_in` is a
/// linear layer, over the keys starting with `prefix`.
fn attention_shapes(weights: &Weights, prefix: &str) -> (usize, bool) {
    let ours = || weights.shapes().iter().filter(move |(k, _)| k.starts_with(prefix));
    let cross = ours().find(|(k, _)| k.ends_with("attn2.to_k.weight")).map_or(768, |(_, s)| s[1]);
    (cross, ours().any(|(k, s)| k.ends_with("proj_in.weight") && s.len() == 2))
}

/// The config of an original-layout ControlNet (keys under `prefix`), read off its keys and
/// shapes: levels, widths and transformer depths from `input_blocks`, the hint encoder from
/// `input_hint_block`, SDXL's `text_time` conditioning from `label_emb`; head counts by family.
pub fn infer_original_config(weights: &Weights, prefix: &str) -> Result<ControlNetConfig, ControlNetError> {
    let path = weights.path();
    let shape = |key: String| weights.shape(&format!("{prefix}{key}")).map(<[usize]>::to_vec);
    let unknown =
        |message: &str| DiffusionError::UnknownArchitecture { path: path.to_path_buf(), message: message.into() };
    let conv_in = shape("input_blocks.0.0.weight".into()).ok_or_else(|| unknown("no `input_blocks.0.0.weight`"))?;
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
    let hint = |i: usize| shape(format!("input_hint_block.{i}.weight"));
    let hint_in = hint(0).ok_or_else(|| unknown("no `input_hint_block.0.weight`"))?;
    let convs = (0..).take_while(|&i| hint(2 * i).is_some()).count();
    // conv_in, then (same-size conv, stride-2 conv) pairs, then conv_out.
    let mut hint_channels = vec![hint_in[0]];
    hint_channels.extend((0..convs.saturating_sub(2) / 2).filter_map(|pair| hint(2 * (2 * pair + 2)).map(|s| s[0])));
    let (cross_attention_dim, use_linear_projection) = attention_shapes(weights, prefix);
    Shapes {
        in_channels: conv_in[1],
        conditioning_channels: hint_in[1],
        levels,
        cross_attention_dim,
        use_linear_projection,
        hint_channels,
        projection_dim: shape("label_emb.0.0.weight".into()).map(|s| s[1]),
    }
    .into_config(path)
}

/// The config of a diffusers-layout single file (such as `diffusers_xl_canny_mid.safetensors`
/// downloaded without its `config.json`), read off its keys and shapes; head counts by family.
pub fn infer_diffusers_config(weights: &Weights) -> Result<ControlNetConfig, ControlNetError> {
    let path = weights.path();
    let shape = |key: String| weights.shape(&key).map(<[usize]>::to_vec);
    let unknown =
        |message: &str| DiffusionError::UnknownArchitecture { path: path.to_path_buf(), message: message.into() };
    let conv_in = shape("conv_in.weight".into()).ok_or_else(|| unknown("no `conv_in.weight`"))?;
    let levels = (0..)
        .map_while(|i| {
            let width = shape(format!("down_blocks.{i}.resnets.0.conv1.weight"))?[0];
            let resnets =
                (0..).take_while(|j| shape(format!("down_blocks.{i}.resnets.{j}.conv1.weight")).is_some()).count();
            let attention = shape(format!("down_blocks.{i}.attentions.0.proj_in.weight")).is_some();
            let depth = (0..)
                .take_while(|d| {
                    shape(format!("down_blocks.{i}.attentions.0.transformer_blocks.{d}.norm1.weight")).is_some()
                })
                .count();
            Some(Level { width, resnets, attention, depth })
        })
        .collect();
    let hint = |name: String| shape(format!("{DIFFUSERS_PREFIX}.{name}.weight"));
    let hint_in = hint("conv_in".into()).ok_or_else(|| unknown("no hint encoder"))?;
    let mut hint_channels = vec![hint_in[0]];
    // blocks alternate a same-size conv and a stride-2 conv that widens.
    hint_channels.extend((0..).map_while(|pair| hint(format!("blocks.{}", 2 * pair + 1)).map(|s| s[0])));
    let (cross_attention_dim, use_linear_projection) = attention_shapes(weights, "down_blocks.");
    Shapes {
        in_channels: conv_in[1],
        conditioning_channels: hint_in[1],
        levels,
        cross_attention_dim,
        use_linear_projection,
        hint_channels,
        projection_dim: shape("add_embedding.linear_1.weight".into()).map(|s| s[1]),
    }
    .into_config(path)
}
