//! CLIP text encoders against transformers 5.24 on tiny seeded models (fixtures from
//! `tools/reference/clip_text.py`), from transformers folders and single-file checkpoints.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, io, write_checkpoint};
use easyphoto_diffusion::diffusers_folder::{self, read_config};
use easyphoto_diffusion::weights::random_var_builder;
use easyphoto_diffusion::{
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, DiffusionError, SingleFile, TextEncoderSlot,
    VisitLayers,
};

const TOL: f32 = 1e-4;

fn config(name: &str) -> CLIPTextConfig {
    read_config(&fixtures().join(name).join("config.json")).unwrap()
}

fn clip_l_folder() -> CLIPTextModel {
    diffusers_folder::load_clip_text_model(&fixtures().join("clip_l"), None, DType::F32, &Device::Cpu).unwrap()
}

fn clip_g_folder() -> CLIPTextModelWithProjection {
    diffusers_folder::load_clip_text_model_with_projection(&fixtures().join("clip_g"), None, DType::F32, &Device::Cpu)
        .unwrap()
}

/// Checks every output of `model` but `text_embeds` against `<name>/io.safetensors`.
fn check_text_model(name: &str, model: &CLIPTextModel) {
    let io = io(&format!("{name}/io.safetensors"));
    let ids = &io["input_ids"];
    let out = model.forward(ids).unwrap();
    let layers = model.config().num_hidden_layers;
    assert_eq!(out.hidden_states.len(), layers + 1);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(&format!("{name} hidden_states[{i}]"), h, &io[&format!("hidden_states_{i}")], TOL);
    }
    assert_close(&format!("{name} last_hidden_state"), &out.last_hidden_state, &io["last_hidden_state"], TOL);
    assert_close(&format!("{name} pooler_output"), &out.pooler_output, &io["pooler_output"], TOL);
    // the penultimate layer alone (SDXL), and with the final norm (SD1 clip skip, SD2)
    let penultimate = model.hidden_state(ids, layers - 1).unwrap();
    assert_close(&format!("{name} penultimate"), &penultimate, &io[&format!("hidden_states_{}", layers - 1)], TOL);
    let normed = model.final_layer_norm(&penultimate).unwrap();
    assert_close(&format!("{name} penultimate_normed"), &normed, &io["penultimate_normed"], TOL);
}

fn check_with_projection(name: &str, model: &CLIPTextModelWithProjection) {
    check_text_model(name, model.text_model());
    let io = io(&format!("{name}/io.safetensors"));
    let out = model.forward(&io["input_ids"]).unwrap();
    assert_close(&format!("{name} text_embeds"), &out.text_embeds, &io["text_embeds"], TOL);
    assert_close(&format!("{name} (projection) pooler_output"), &out.pooler_output, &io["pooler_output"], TOL);
}

/// The checkpoint tensors described by `<list>.ldm_keys.json` (entries
/// `[checkpoint_key, source_folder, folder_key, shape]`, weights in `<folder>/model.safetensors`).
fn key_list_tensors(list: &str) -> HashMap<String, Tensor> {
    let text = std::fs::read_to_string(fixtures().join(format!("{list}.ldm_keys.json"))).unwrap();
    let entries: Vec<(String, String, String, Vec<usize>)> = serde_json::from_str(&text).unwrap();
    let mut folders: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    entries
        .into_iter()
        .map(|(key, folder, folder_key, shape)| {
            let tensors = folders.entry(folder.clone()).or_insert_with(|| io(&format!("{folder}/model.safetensors")));
            (key, tensors[&folder_key].reshape(shape).unwrap())
        })
        .collect()
}

/// The bigG weights in OpenCLIP layout under `conditioner.embedders.1.model.`, re-prefixed.
fn open_clip_tensors(prefix: &str) -> HashMap<String, Tensor> {
    io("clip_g/openclip.safetensors")
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{}", k.strip_prefix("conditioner.embedders.1.model.").unwrap()), v))
        .collect()
}

fn single_file(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> (PathBuf, SingleFile) {
    let path = write_checkpoint(dir, name, tensors);
    let file = SingleFile::open(&path).unwrap();
    (path, file)
}

/// The inferred config agrees with the reference on everything the shapes record.
fn assert_shapes_agree(inferred: &CLIPTextConfig, reference: &CLIPTextConfig) {
    assert_eq!(inferred.vocab_size, reference.vocab_size);
    assert_eq!(inferred.hidden_size, reference.hidden_size);
    assert_eq!(inferred.intermediate_size, reference.intermediate_size);
    assert_eq!(inferred.num_hidden_layers, reference.num_hidden_layers);
    assert_eq!(inferred.max_position_embeddings, reference.max_position_embeddings);
    assert_eq!(inferred.hidden_act, reference.hidden_act);
    assert_eq!(inferred.eos_token_id, Some(2));
}

#[test]
fn clip_l_folder_matches_transformers() {
    check_text_model("clip_l", &clip_l_folder());
}

#[test]
fn clip_g_folder_with_projection_matches_transformers() {
    check_with_projection("clip_g", &clip_g_folder());
}

/// The fused CPU layer (`cpu::text_layer`) against the plain candle composition, with both
/// activations, widths with and without whole register tiles, two 77-token chunks.
#[test]
fn fused_layers_match_the_plain_composition() {
    for (hidden, heads, act) in [(96, 4, "quick_gelu"), (80, 5, "gelu")] {
        let config = CLIPTextConfig {
            hidden_size: hidden,
            intermediate_size: 4 * hidden,
            num_attention_heads: heads,
            num_hidden_layers: 3,
            hidden_act: act.into(),
            vocab_size: 1000,
            ..Default::default()
        };
        let model = CLIPTextModel::new(random_var_builder(DType::F32, &Device::Cpu), &config).unwrap();
        let ids: Vec<u32> = (0..154).map(|i| (i * 37) % 1000).collect();
        let ids = Tensor::from_vec(ids, (2, 77), &Device::Cpu).unwrap();
        easyphoto_diffusion::cpu::set_enabled(Some(true));
        let fused = model.forward(&ids).unwrap();
        easyphoto_diffusion::cpu::set_enabled(Some(false));
        let plain = model.forward(&ids).unwrap();
        easyphoto_diffusion::cpu::set_enabled(None);
        for (i, (a, b)) in fused.hidden_states.iter().zip(&plain.hidden_states).enumerate() {
            assert_close(&format!("{act} hidden_states[{i}]"), a, b, TOL);
        }
        assert_close(&format!("{act} last_hidden_state"), &fused.last_hidden_state, &plain.last_hidden_state, TOL);
    }
}

#[test]
fn every_hidden_state_stops_early_at_its_layer() {
    let model = clip_g_folder();
    let io = io("clip_g/io.safetensors");
    for layer in 0..=4 {
        let h = model.text_model().hidden_state(&io["input_ids"], layer).unwrap();
        assert_close(&format!("hidden_state({layer})"), &h, &io[&format!("hidden_states_{layer}")], TOL);
    }
    let err = model.text_model().hidden_state(&io["input_ids"], 5).unwrap_err();
    assert!(matches!(err, DiffusionError::InvalidInput { name: "layer", .. }), "{err:?}");
}

#[test]
fn fp16_variant_folder_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [("config.json", "config.json"), ("model.safetensors", "model.fp16.safetensors")] {
        std::fs::copy(fixtures().join("clip_l").join(from), dir.path().join(to)).unwrap();
    }
    let model = diffusers_folder::load_clip_text_model(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    check_text_model("clip_l", &model);
    let err = diffusers_folder::load_clip_text_model(dir.path(), None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(&err, DiffusionError::Io { path, .. } if path.ends_with("model.safetensors")), "{err:?}");
}

#[test]
fn f16_compute_stays_close_to_f32() {
    let dir = fixtures().join("clip_g");
    let model = diffusers_folder::load_clip_text_model_with_projection(&dir, None, DType::F16, &Device::Cpu).unwrap();
    let io = io("clip_g/io.safetensors");
    let out = model.forward(&io["input_ids"]).unwrap();
    assert_eq!(out.last_hidden_state.dtype(), DType::F16);
    for (name, ours) in [("last_hidden_state", &out.last_hidden_state), ("text_embeds", &out.text_embeds)] {
        let err = common::max_abs_diff(ours, &io[name]);
        assert!(err < 0.05, "{name}: f16 error {err}");
    }
}

#[test]
fn sd15_single_file_clip_l_matches() {
    let dir = tempfile::tempdir().unwrap();
    // with the `text_model.` level, and without it (some old SD1 checkpoints)
    for list in ["clip_l_sd15", "clip_l_sd15_legacy"] {
        let (_, file) = single_file(dir.path(), &format!("{list}.safetensors"), &key_list_tensors(list));
        assert_eq!(file.text_encoders(), vec![TextEncoderSlot::TextEncoder], "{list}");
        let inferred = file.text_encoder_config(TextEncoderSlot::TextEncoder).unwrap();
        assert_shapes_agree(&inferred, &config("clip_l"));
        // Released encoders have 64-wide heads; these tiny ones have 8-wide heads, which no shape
        // records, so the reference config is passed (as diffusers' `config=` does).
        assert_eq!(inferred.num_attention_heads, 1);
        let model =
            file.load_text_encoder(TextEncoderSlot::TextEncoder, &config("clip_l"), DType::F32, &Device::Cpu).unwrap();
        check_text_model("clip_l", &model);
    }
}

#[test]
fn sdxl_single_file_holds_both_encoders() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = key_list_tensors("clip_l_sdxl");
    tensors.extend(open_clip_tensors("conditioner.embedders.1.model."));
    let (_, file) = single_file(dir.path(), "sdxl.safetensors", &tensors);
    assert_eq!(file.text_encoders(), vec![TextEncoderSlot::TextEncoder, TextEncoderSlot::TextEncoder2]);

    let inferred = file.text_encoder_config(TextEncoderSlot::TextEncoder).unwrap();
    assert_shapes_agree(&inferred, &config("clip_l"));
    let clip_l =
        file.load_text_encoder(TextEncoderSlot::TextEncoder, &config("clip_l"), DType::F32, &Device::Cpu).unwrap();
    check_text_model("clip_l", &clip_l);

    let inferred = file.text_encoder_config(TextEncoderSlot::TextEncoder2).unwrap();
    let reference = config("clip_g");
    assert_shapes_agree(&inferred, &reference);
    assert_eq!(inferred.projection_dim, reference.projection_dim);
    let clip_g = file
        .load_text_encoder_with_projection(TextEncoderSlot::TextEncoder2, &reference, DType::F32, &Device::Cpu)
        .unwrap();
    check_with_projection("clip_g", &clip_g);
}

#[test]
fn sdxl_refiner_single_file_has_only_the_second_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) =
        single_file(dir.path(), "refiner.safetensors", &open_clip_tensors("conditioner.embedders.0.model."));
    assert_eq!(file.text_encoders(), vec![TextEncoderSlot::TextEncoder2]);
    let clip_g = file
        .load_text_encoder_with_projection(TextEncoderSlot::TextEncoder2, &config("clip_g"), DType::F32, &Device::Cpu)
        .unwrap();
    check_with_projection("clip_g", &clip_g);
}

#[test]
fn sd2_single_file_drops_the_last_open_clip_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = single_file(dir.path(), "sd2.safetensors", &open_clip_tensors("cond_stage_model.model."));
    assert_eq!(file.text_encoders(), vec![TextEncoderSlot::TextEncoder]);
    let inferred = file.text_encoder_config(TextEncoderSlot::TextEncoder).unwrap();
    let reference = CLIPTextConfig { num_hidden_layers: 3, ..config("clip_g") };
    assert_shapes_agree(&inferred, &reference);
    let model = file.load_text_encoder(TextEncoderSlot::TextEncoder, &reference, DType::F32, &Device::Cpu).unwrap();
    let io = io("clip_g/io.safetensors");
    let out = model.forward(&io["input_ids"]).unwrap();
    assert_close("sd2 last_hidden_state", &out.last_hidden_state, &io["penultimate_normed"], TOL);
}

#[test]
fn layers_have_transformers_paths() {
    let mut model = clip_g_folder();
    let paths = model.layer_paths();
    assert_eq!(paths.len(), 4 * 6 + 1);
    for path in [
        "text_model.encoder.layers.0.self_attn.q_proj",
        "text_model.encoder.layers.0.self_attn.out_proj",
        "text_model.encoder.layers.3.mlp.fc1",
        "text_model.encoder.layers.3.mlp.fc2",
        "text_projection",
    ] {
        assert!(paths.iter().any(|p| p == path), "{path} not in {paths:?}");
    }
    // a single-file OpenCLIP model has the same paths
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = single_file(dir.path(), "g.safetensors", &open_clip_tensors("conditioner.embedders.1.model."));
    let mut from_file = file
        .load_text_encoder_with_projection(TextEncoderSlot::TextEncoder2, &config("clip_g"), DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(from_file.layer_paths(), paths);
}

#[test]
fn missing_keys_are_listed_under_their_stored_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = open_clip_tensors("conditioner.embedders.1.model.");
    let gone = [
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
    ];
    for key in gone {
        assert!(tensors.remove(key).is_some(), "{key} not in the fixture");
    }
    let (path, file) = single_file(dir.path(), "missing.safetensors", &tensors);
    let err = file
        .load_text_encoder_with_projection(TextEncoderSlot::TextEncoder2, &config("clip_g"), DType::F32, &Device::Cpu)
        .unwrap_err();
    match err {
        DiffusionError::MissingKeys { path: p, keys } => {
            assert_eq!(p, path);
            assert_eq!(keys, gone.map(String::from).to_vec());
        }
        other => panic!("expected missing keys, got {other:?}"),
    }

    let mut tensors = key_list_tensors("clip_l_sd15");
    let key = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias";
    tensors.remove(key).unwrap();
    let (_, file) = single_file(dir.path(), "missing_l.safetensors", &tensors);
    let err =
        file.load_text_encoder(TextEncoderSlot::TextEncoder, &config("clip_l"), DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(&err, DiffusionError::MissingKeys { keys, .. } if keys == &[key.to_string()]), "{err:?}");
}

#[test]
fn wrong_shapes_name_stored_key_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = open_clip_tensors("conditioner.embedders.1.model.");
    let fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias";
    let projection = "conditioner.embedders.1.model.text_projection";
    tensors.insert(fused.into(), Tensor::zeros(96, DType::F16, &Device::Cpu).unwrap());
    tensors.insert(projection.into(), Tensor::zeros((40, 48), DType::F16, &Device::Cpu).unwrap());
    let (path, file) = single_file(dir.path(), "wrong_shape.safetensors", &tensors);
    let err = file
        .load_text_encoder_with_projection(TextEncoderSlot::TextEncoder2, &config("clip_g"), DType::F32, &Device::Cpu)
        .unwrap_err();
    match err {
        DiffusionError::ShapeMismatch { path: p, mut mismatches } => {
            assert_eq!(p, path);
            mismatches.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(mismatches.len(), 2, "{mismatches:?}");
            assert_eq!((mismatches[0].key.as_str(), &mismatches[0].expected[..]), (projection, &[48, 40][..]));
            assert_eq!(mismatches[0].found, vec![40, 48]);
            assert_eq!((mismatches[1].key.as_str(), &mismatches[1].expected[..]), (fused, &[144][..]));
            assert_eq!(mismatches[1].found, vec![96]);
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
}

#[test]
fn folder_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, r#"{"hidden_size": 48, "num_attention_heads": 5}"#).unwrap();
    let err = diffusers_folder::load_clip_text_model(dir.path(), None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, DiffusionError::Config { path, field, .. } if path == &config_path && field == "num_attention_heads"),
        "{err:?}"
    );
    std::fs::write(&config_path, r#"{"hidden_act": "relu"}"#).unwrap();
    let err = diffusers_folder::load_clip_text_model(dir.path(), None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(&err, DiffusionError::Config { field, .. } if field == "hidden_act"), "{err:?}");
    std::fs::write(&config_path, r#"{"projection_dim": null}"#).unwrap();
    let err =
        diffusers_folder::load_clip_text_model_with_projection(dir.path(), None, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(&err, DiffusionError::Config { field, .. } if field == "projection_dim"), "{err:?}");
}

#[test]
fn bad_input_ids_are_input_errors() {
    let model = clip_l_folder();
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    let out_of_vocab = Tensor::new(&[[0u32, 1000]], &Device::Cpu).unwrap();
    let float = Tensor::zeros((1, 77), DType::F32, &Device::Cpu).unwrap();
    let negative = Tensor::new(&[[0i64, -1]], &Device::Cpu).unwrap();
    for ids in [too_long, out_of_vocab, float, negative] {
        let err = model.forward(&ids).unwrap_err();
        assert!(matches!(err, DiffusionError::InvalidInput { name: "input_ids", .. }), "{err:?}");
    }
    // shorter prompts are fine
    let short = Tensor::new(&[[998u32, 5, 999]], &Device::Cpu).unwrap();
    assert_eq!(model.forward(&short).unwrap().last_hidden_state.dims(), &[1, 3, 32]);
}

#[test]
fn no_text_encoder_is_unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let tensors: HashMap<String, Tensor> =
        [("model.diffusion_model.x".to_string(), Tensor::zeros(1, DType::F16, &Device::Cpu).unwrap())].into();
    let (_, file) = single_file(dir.path(), "unet_only.safetensors", &tensors);
    assert!(file.text_encoders().is_empty());
    let err = file.text_encoder_config(TextEncoderSlot::TextEncoder).unwrap_err();
    assert!(matches!(err, DiffusionError::UnknownArchitecture { .. }), "{err:?}");
    assert!(
        err.to_string().contains("no text_encoder (no token embedding under cond_stage_model.transformer."),
        "{err}"
    );
}
