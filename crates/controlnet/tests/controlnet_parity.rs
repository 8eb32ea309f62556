//! `ControlNetModel` against diffusers on tiny seeded random models
//! (`tools/reference/controlnet_model.py`): every residual, diffusers' guess-mode scaling, and the
//! tiny UNet's output with the residuals; loading from diffusers folders, the original `.pth`
//! layout (with and without `control_model.`, as `.pth` and `.safetensors`) and typed errors.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, diffusion_fixtures, fixtures, io};
use easyphoto_controlnet::control::apply_mode;
use easyphoto_controlnet::load::{infer_diffusers_config, infer_original_config};
use easyphoto_controlnet::{ControlMode, ControlNetConfig, ControlNetError, ControlNetModel, load_controlnet};
use easyphoto_diffusion::diffusers_folder::{self, read_config};
use easyphoto_diffusion::sampling::Residuals;
use easyphoto_diffusion::weights::Weights;
use easyphoto_diffusion::{DiffusionError, UNetConditioning};

/// Residuals and the UNet output are sums of O(1) terms computed in float32 on float16-exact
/// weights; diffusers and we differ only in summation order (~1e-6).
const TOL: f32 = 1e-4;

fn cond<'a>(t: &'a HashMap<String, Tensor>) -> UNetConditioning<'a> {
    UNetConditioning { text_embeds: t.get("text_embeds"), time_ids: t.get("time_ids"), ..Default::default() }
}

fn forward(model: &ControlNetModel, t: &HashMap<String, Tensor>) -> Residuals {
    model.forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"], &t["controlnet_cond"], &cond(t)).unwrap()
}

/// Checks every residual against diffusers; returns the largest error.
fn check_residuals(what: &str, r: &Residuals, t: &HashMap<String, Tensor>, prefix: &str) -> f32 {
    let n = (0..).take_while(|i| t.contains_key(&format!("{prefix}down_{i}"))).count();
    assert_eq!(r.down.len(), n, "{what}: number of down residuals");
    let mut worst = 0f32;
    for (i, d) in r.down.iter().enumerate() {
        worst = worst.max(assert_close(&format!("{what} {prefix}down_{i}"), d, &t[&format!("{prefix}down_{i}")], TOL));
    }
    worst.max(assert_close(&format!("{what} {prefix}mid"), &r.mid, &t[&format!("{prefix}mid")], TOL))
}

fn folder_model(name: &str) -> ControlNetModel {
    load_controlnet(&fixtures().join(name), None, DType::F32, &Device::Cpu).unwrap()
}

fn folder_config(name: &str) -> ControlNetConfig {
    read_config(&fixtures().join(name).join("config.json")).unwrap()
}

/// Runs the tiny UNet `unet` with the residuals scaled by the fixture's `residual_scale`.
fn check_unet_with_residuals(unet: &str, r: &Residuals, t: &HashMap<String, Tensor>) -> f32 {
    let unet = diffusers_folder::load_unet(&diffusion_fixtures().join(unet), None, DType::F32, &Device::Cpu).unwrap();
    let scale = t["residual_scale"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let down: Vec<Tensor> = r.down.iter().map(|d| (d * scale).unwrap()).collect();
    let mid = (&r.mid * scale).unwrap();
    let c = UNetConditioning {
        down_block_additional_residuals: Some(&down),
        mid_block_additional_residual: Some(&mid),
        ..cond(t)
    };
    let out = unet.forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"], &c).unwrap();
    assert_close("unet_out_with_residuals", &out, &t["unet_out_with_residuals"], TOL)
}

#[test]
fn sd15_residuals_and_unet_output_match_diffusers() {
    let t = io("sd15_controlnet_io.safetensors");
    let model = folder_model("sd15_controlnet");
    let r = forward(&model, &t);
    assert_eq!(r.down.len(), model.config().num_down_residuals());
    let err = check_residuals("sd15", &r, &t, "");
    let unet_err = check_unet_with_residuals("sd15", &r, &t);
    println!("sd15: residuals max abs error {err:e}, UNet output {unet_err:e}");
}

#[test]
fn guess_mode_scaling_matches_diffusers() {
    // diffusers' ControlNet with guess_mode=True and conditioning_scale=0.6, without CFG.
    let t = io("sd15_controlnet_io.safetensors");
    let r = forward(&folder_model("sd15_controlnet"), &t);
    let guessed = apply_mode(&r, ControlMode::GuessMode, 0.6, false).unwrap();
    let err = check_residuals("sd15 guess mode", &guessed, &t, "guess_");
    println!("guess mode: max abs error {err:e}");
}

#[test]
fn sdxl_mid_variant_residuals_and_unet_output_match_diffusers() {
    let t = io("sdxl_controlnet_io.safetensors");
    let model = folder_model("sdxl_controlnet");
    assert!(model.config().uses_text_time());
    let r = forward(&model, &t);
    let err = check_residuals("sdxl", &r, &t, "");
    let unet_err = check_unet_with_residuals("sdxl", &r, &t);
    println!("sdxl: residuals max abs error {err:e}, UNet output {unet_err:e}");
}

#[test]
fn original_pth_loads_to_the_same_numbers() {
    let t = io("sd15_controlnet_io.safetensors");
    let config = folder_config("sd15_controlnet");
    let model =
        load_controlnet(&fixtures().join("sd15_controlnet.pth"), Some(&config), DType::F32, &Device::Cpu).unwrap();
    let err = check_residuals("original .pth", &forward(&model, &t), &t, "");
    println!("original .pth: max abs error {err:e}");
}

/// The `.pth` tensors renamed by `rename`, written as a `.safetensors` file in `dir`.
fn pth_as_safetensors(dir: &Path, rename: impl Fn(&str) -> Option<String>) -> std::path::PathBuf {
    let tensors: HashMap<String, Tensor> = candle_core::pickle::read_all(fixtures().join("sd15_controlnet.pth"))
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| rename(&k).map(|k| (k, v)))
        .collect();
    let path = dir.join("control_sd15_tiny.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn original_safetensors_without_prefix_loads_to_the_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = pth_as_safetensors(dir.path(), |k| k.strip_prefix("control_model.").map(str::to_string));
    let t = io("sd15_controlnet_io.safetensors");
    let config = folder_config("sd15_controlnet");
    let model = load_controlnet(&path, Some(&config), DType::F32, &Device::Cpu).unwrap();
    let err = check_residuals("original .safetensors", &forward(&model, &t), &t, "");
    println!("original .safetensors without prefix: max abs error {err:e}");
}

#[test]
fn config_inferred_from_original_keys() {
    let weights = Weights::open(fixtures().join("sd15_controlnet.pth")).unwrap();
    let inferred = infer_original_config(&weights, "control_model.").unwrap();
    let config = folder_config("sd15_controlnet");
    assert_eq!(inferred.block_out_channels, config.block_out_channels);
    assert_eq!(inferred.down_block_types, config.down_block_types);
    assert_eq!(inferred.layers_per_block, config.layers_per_block);
    assert_eq!(inferred.cross_attention_dim, config.cross_attention_dim);
    assert_eq!(inferred.use_linear_projection, config.use_linear_projection);
    assert_eq!(inferred.conditioning_embedding_out_channels, config.conditioning_embedding_out_channels);
    assert_eq!(inferred.in_channels, 4);
    assert_eq!(inferred.addition_embed_type, None);
    // Head counts cannot be read off shapes; the family rule (8 heads for a 768-wide context,
    // 64-wide heads otherwise) does not fit the tiny model, so only the shapes are checked here:
    // loading without a config must succeed with every key used and every shape right.
    load_controlnet(&fixtures().join("sd15_controlnet.pth"), None, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn diffusers_layout_single_file_loads_with_or_without_config() {
    // Like `diffusers_xl_canny_mid.safetensors` from sd_control_collection: diffusers keys, no config.
    let file = fixtures().join("sdxl_controlnet/diffusion_pytorch_model.safetensors");
    let config = folder_config("sdxl_controlnet");
    let t = io("sdxl_controlnet_io.safetensors");
    let model = load_controlnet(&file, Some(&config), DType::F32, &Device::Cpu).unwrap();
    check_residuals("sdxl single file", &forward(&model, &t), &t, "");

    let inferred = infer_diffusers_config(&Weights::open(&file).unwrap()).unwrap();
    assert_eq!(inferred.block_out_channels, config.block_out_channels);
    assert_eq!(inferred.down_block_types, config.down_block_types);
    assert_eq!(inferred.layers_per_block, config.layers_per_block);
    assert_eq!(inferred.transformer_layers_per_block, config.transformer_layers_per_block);
    assert_eq!(inferred.cross_attention_dim, config.cross_attention_dim);
    assert_eq!(inferred.use_linear_projection, config.use_linear_projection);
    assert_eq!(inferred.conditioning_embedding_out_channels, config.conditioning_embedding_out_channels);
    assert_eq!(inferred.projection_class_embeddings_input_dim, config.projection_class_embeddings_input_dim);
    assert_eq!(inferred.addition_embed_type.as_deref(), Some("text_time"));
    // Head counts and the time-id width (SDXL's 256) follow the released models, not the tiny
    // one; every key and shape must still fit.
    load_controlnet(&file, None, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn missing_keys_are_listed_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let dropped = ["control_model.zero_convs.3.0.bias", "control_model.middle_block.1.proj_out.weight"];
    let path = pth_as_safetensors(dir.path(), |k| (!dropped.contains(&k)).then(|| k.to_string()));
    let config = folder_config("sd15_controlnet");
    match load_controlnet(&path, Some(&config), DType::F32, &Device::Cpu) {
        Err(ControlNetError::Diffusion(DiffusionError::MissingKeys { path: p, keys })) => {
            assert_eq!(p, path);
            assert_eq!(keys, dropped.iter().rev().map(|k| k.to_string()).collect::<Vec<_>>());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_config_reports_shape_mismatches() {
    let config = ControlNetConfig { cross_attention_dim: 48, ..folder_config("sd15_controlnet") };
    match load_controlnet(&fixtures().join("sd15_controlnet.pth"), Some(&config), DType::F32, &Device::Cpu) {
        Err(ControlNetError::Diffusion(DiffusionError::ShapeMismatch { mismatches, .. })) => {
            assert!(
                mismatches.iter().all(|m| m.key.ends_with("attn2.to_k.weight") || m.key.ends_with("attn2.to_v.weight"))
            );
            assert!(
                mismatches
                    .iter()
                    .any(|m| m.key == "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
                        && m.expected == [32, 48]
                        && m.found == [32, 32])
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_and_foreign_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("sd15_controlnet.pth")).unwrap();
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    match load_controlnet(&truncated, None, DType::F32, &Device::Cpu) {
        Err(ControlNetError::Diffusion(DiffusionError::Checkpoint { path, .. })) => assert_eq!(path, truncated),
        other => panic!("{other:?}"),
    }
    // A UNet checkpoint is not a ControlNet.
    let unet = diffusion_fixtures().join("sd15/diffusion_pytorch_model.safetensors");
    match load_controlnet(&unet, None, DType::F32, &Device::Cpu) {
        Err(ControlNetError::Diffusion(DiffusionError::UnknownArchitecture { path, .. })) => assert_eq!(path, unet),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unsupported_config_values_are_refused_by_name() {
    let config = ControlNetConfig { global_pool_conditions: true, ..folder_config("sd15_controlnet") };
    match load_controlnet(&fixtures().join("sd15_controlnet"), Some(&config), DType::F32, &Device::Cpu) {
        Err(ControlNetError::Diffusion(DiffusionError::Config { field, .. })) => {
            assert_eq!(field, "global_pool_conditions")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_image_size_is_an_input_error() {
    let t = io("sd15_controlnet_io.safetensors");
    let model = folder_model("sd15_controlnet");
    let small = t["controlnet_cond"].narrow(2, 0, 16).unwrap();
    let err = model
        .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"], &small, &UNetConditioning::default())
        .unwrap_err();
    assert!(matches!(err, ControlNetError::InvalidInput { field: "controlnet_cond", .. }), "{err:?}");
}

#[test]
fn diffusers_folder_with_only_the_fp16_variant_loads() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("sd15_controlnet");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(
        source.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let t = io("sd15_controlnet_io.safetensors");
    let model = load_controlnet(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    check_residuals("fp16 variant folder", &forward(&model, &t), &t, "");
}

/// A weightless (sparse, all-zero) float16 safetensors file with the given keys and shapes.
fn sparse_checkpoint(
    dir: &Path,
    name: &str,
    shapes: &serde_json::Map<String, serde_json::Value>,
) -> std::path::PathBuf {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (key, shape) in shapes {
        let dims: Vec<usize> = serde_json::from_value(shape.clone()).unwrap();
        let bytes = 2 * dims.iter().product::<usize>();
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": "F16", "shape": dims, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut file, &(text.len() as u64).to_le_bytes()).unwrap();
    std::io::Write::write_all(&mut file, &text).unwrap();
    file.set_len((8 + text.len() + offset) as u64).unwrap();
    path
}

/// The fields the inference reads off shapes, and per attention level the heads and depth.
fn assert_same_architecture(inferred: &ControlNetConfig, real: &ControlNetConfig) {
    assert_eq!(inferred.block_out_channels, real.block_out_channels);
    assert_eq!(inferred.down_block_types, real.down_block_types);
    assert_eq!(inferred.layers_per_block, real.layers_per_block);
    assert_eq!(inferred.cross_attention_dim, real.cross_attention_dim);
    assert_eq!(inferred.use_linear_projection, real.use_linear_projection);
    assert_eq!(inferred.conditioning_embedding_out_channels, real.conditioning_embedding_out_channels);
    assert_eq!(inferred.addition_embed_type, real.addition_embed_type);
    assert_eq!(inferred.addition_time_embed_dim, real.addition_time_embed_dim);
    assert_eq!(inferred.projection_class_embeddings_input_dim, real.projection_class_embeddings_input_dim);
    let n = real.block_out_channels.len();
    let heads =
        |c: &ControlNetConfig| c.num_attention_heads.as_ref().unwrap_or(&c.attention_head_dim).expand(n).unwrap();
    let depth = |c: &ControlNetConfig| c.transformer_layers_per_block.expand(n).unwrap();
    for (i, kind) in real.down_block_types.iter().enumerate() {
        if kind == "CrossAttnDownBlock2D" {
            assert_eq!(heads(inferred)[i], heads(real)[i], "heads of level {i}");
            assert_eq!(depth(inferred)[i], depth(real)[i], "transformer depth of level {i}");
        }
    }
}

#[test]
fn config_inference_fits_full_size_layouts() {
    // Key names and shapes of a full-size SD 1.5 ControlNet (original layout, as
    // control_v11p_sd15_canny.pth) and of an SDXL-width reduced-depth one (diffusers layout).
    let text = std::fs::read_to_string(fixtures().join("full_size_layouts.json")).unwrap();
    let layouts: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, original) in [("sd15_original", true), ("sdxl_reduced_diffusers", false)] {
        let real: ControlNetConfig = serde_json::from_value(layouts[name]["config"].clone()).unwrap();
        let path =
            sparse_checkpoint(dir.path(), &format!("{name}.safetensors"), layouts[name]["shapes"].as_object().unwrap());
        let weights = Weights::open(&path).unwrap();
        let inferred = if original {
            infer_original_config(&weights, "control_model.").unwrap()
        } else {
            infer_diffusers_config(&weights).unwrap()
        };
        assert_same_architecture(&inferred, &real);
    }
    // Every key of the full-size original layout found, every shape right (float16, no weights).
    let sd15 = dir.path().join("sd15_original.safetensors");
    load_controlnet(&sd15, None, DType::F16, &Device::Cpu).unwrap();
}
