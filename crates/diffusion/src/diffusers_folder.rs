//! Models stored as diffusers folders: `config.json` beside `diffusion_pytorch_model.safetensors`
//! (optionally a `.fp16` / `.bf16` variant, sharded with an `.index.json`, or a pickle `.bin`).
//! Text encoders are transformers folders: `config.json` beside `model.safetensors`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::de::DeserializeOwned;

use crate::clip::{self, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection};
use crate::error::{DiffusionError, Result};
use crate::unet_2d_condition::{UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::weights::Weights;

const WEIGHTS_NAME: &str = "diffusion_pytorch_model";

/// Reads and parses a diffusers `config.json`.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).map_err(|source| DiffusionError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| DiffusionError::config(path, "(json)", e.to_string()))
}

/// Opens the weights of a diffusers model folder; `variant` picks e.g.
/// `diffusion_pytorch_model.fp16.safetensors`.
pub fn open_weights(dir: &Path, variant: Option<&str>) -> Result<Weights> {
    let stem = match variant {
        Some(v) => format!("{WEIGHTS_NAME}.{v}"),
        None => WEIGHTS_NAME.to_string(),
    };
    let single = dir.join(format!("{stem}.safetensors"));
    if single.exists() {
        return Weights::open(&single);
    }
    // diffusers puts the variant before `.json` in index names: `…safetensors.index.fp16.json`.
    let index = match variant {
        Some(v) => dir.join(format!("{WEIGHTS_NAME}.safetensors.index.{v}.json")),
        None => dir.join(format!("{WEIGHTS_NAME}.safetensors.index.json")),
    };
    if index.exists() {
        let shards = shard_files(&index)?;
        return Weights::open_shards(&index, &shards);
    }
    let bin = dir.join(format!("{stem}.bin"));
    if bin.exists() {
        return Weights::open(&bin);
    }
    Err(DiffusionError::Io {
        path: single,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no weights (.safetensors, .safetensors.index.json or .bin)",
        ),
    })
}

/// The shard files named by a `*.safetensors.index.json`, in first-use order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let parsed: Index = read_config(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = vec![];
    for file in parsed.weight_map.values() {
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

/// The pre-0.14 diffusers names of the VAE attention (`query`, `key`, `value`, `proj_attn`).
fn legacy_attention_name(name: &str) -> Option<String> {
    [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")]
        .iter()
        .find(|(new, _)| name.contains(new))
        .map(|(new, old)| name.replacen(new, old, 1))
}

fn build<M>(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
    f: impl FnOnce(candle_nn::VarBuilder) -> Result<M>,
) -> Result<M> {
    let weights = Arc::new(open_weights(dir, variant)?);
    let lookup = weights.clone();
    let rename = move |name: &str| match legacy_attention_name(name) {
        Some(old) if !lookup.contains(name) && lookup.contains(&old) => old,
        _ => name.to_string(),
    };
    let (vb, report) = weights.var_builder(rename, dtype, device);
    let model = f(vb)?;
    weights.check(&report)?;
    Ok(model)
}

/// Loads `dir/config.json` and the weights beside it as a UNet.
pub fn load_unet(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> Result<UNet2DConditionModel> {
    let config_path = dir.join("config.json");
    let config: UNet2DConditionModelConfig = read_config(&config_path)?;
    config.validate().map_err(|(f, m)| DiffusionError::config(&config_path, f, m))?;
    build(dir, variant, dtype, device, |vb| UNet2DConditionModel::new(vb, &config))
}

/// Loads `dir/config.json` and the weights beside it as a VAE.
pub fn load_vae(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
    let config_path = dir.join("config.json");
    let config: AutoencoderKLConfig = read_config(&config_path)?;
    config.validate().map_err(|(f, m)| DiffusionError::config(&config_path, f, m))?;
    build(dir, variant, dtype, device, |vb| AutoencoderKL::new(vb, &config))
}

/// `file` with `variant` inserted before its extension, as transformers and diffusers name
/// variants (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`).
fn with_variant(file: &str, variant: Option<&str>) -> String {
    match (variant, file.rsplit_once('.')) {
        (Some(v), Some((stem, ext))) => format!("{stem}.{v}.{ext}"),
        _ => file.to_string(),
    }
}

/// Opens the weights of a transformers model folder (a pipeline's `text_encoder/`):
/// `model.safetensors`, shards listed in `model.safetensors.index.json`, or `pytorch_model.bin`.
pub fn open_transformers_weights(dir: &Path, variant: Option<&str>) -> Result<Weights> {
    let single = dir.join(with_variant("model.safetensors", variant));
    if single.exists() {
        return Weights::open(&single);
    }
    let index = dir.join(with_variant("model.safetensors.index.json", variant));
    if index.exists() {
        let shards = shard_files(&index)?;
        return Weights::open_shards(&index, &shards);
    }
    let bin = dir.join(with_variant("pytorch_model.bin", variant));
    if bin.exists() {
        return Weights::open(&bin);
    }
    Err(DiffusionError::Io {
        path: single,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no weights (.safetensors, .safetensors.index.json or pytorch_model.bin)",
        ),
    })
}

fn build_text_encoder<M>(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
    check: impl FnOnce(&CLIPTextConfig) -> Option<(&'static str, &'static str)>,
    new: impl FnOnce(candle_nn::VarBuilder, &CLIPTextConfig) -> Result<M>,
) -> Result<M> {
    let config_path = dir.join("config.json");
    let config: CLIPTextConfig = read_config(&config_path)?;
    config.validate().map_err(|(f, m)| DiffusionError::config(&config_path, f, m))?;
    if let Some((field, message)) = check(&config) {
        return Err(DiffusionError::config(&config_path, field, message));
    }
    let weights = Arc::new(open_transformers_weights(dir, variant)?);
    let lookup = weights.clone();
    let (vb, report) =
        weights.var_builder(move |name| clip::stored_key(|k| lookup.contains(k), "", name), dtype, device);
    let model = new(vb, &config)?;
    weights.check(&report)?;
    Ok(model)
}

/// Loads a transformers `CLIPTextModel` folder (`text_encoder/`: `config.json` and weights, with
/// or without the `text_model.` level that transformers >= 5.6 leaves out).
pub fn load_clip_text_model(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> Result<CLIPTextModel> {
    build_text_encoder(dir, variant, dtype, device, |_| None, CLIPTextModel::new)
}

/// Loads a transformers `CLIPTextModelWithProjection` folder (SDXL's `text_encoder_2/`).
pub fn load_clip_text_model_with_projection(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<CLIPTextModelWithProjection> {
    let check = |c: &CLIPTextConfig| c.projection_dim.is_none().then_some(("projection_dim", "is required"));
    build_text_encoder(dir, variant, dtype, device, check, CLIPTextModelWithProjection::new)
}
