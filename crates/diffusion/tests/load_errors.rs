//! Bad checkpoints give typed errors that name the file and the problem.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, ldm_tensors, write_checkpoint};
use easyphoto_diffusion::{DiffusionError, load_unet, load_vae};

#[test]
fn truncated_safetensors_is_a_checkpoint_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("sd15/diffusion_pytorch_model.safetensors")).unwrap();
    let path = dir.path().join("truncated.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    match load_unet(&path, DType::F32, &Device::Cpu) {
        Err(DiffusionError::Checkpoint { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn truncated_ckpt_is_a_checkpoint_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("inpaint.ldm.ckpt")).unwrap();
    let path = dir.path().join("truncated.ckpt");
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = load_unet(&path, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, DiffusionError::Checkpoint { .. }), "{err:?}");
    assert!(err.to_string().contains("truncated.ckpt"), "{err}");
}

#[test]
fn missing_file_is_an_io_error() {
    let err = load_unet("/nonexistent/model.safetensors".as_ref(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, DiffusionError::Io { .. }), "{err:?}");
}

#[test]
fn missing_keys_are_all_listed() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = ldm_tensors("sd15");
    let gone = [
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.output_blocks.5.2.conv.bias",
    ];
    for key in gone {
        assert!(tensors.remove(key).is_some(), "{key} not in the fixture");
    }
    let path = write_checkpoint(dir.path(), "missing.safetensors", &tensors);
    match load_unet(&path, DType::F32, &Device::Cpu) {
        Err(DiffusionError::MissingKeys { path: p, keys }) => {
            assert_eq!(p, path);
            assert_eq!(keys, gone.map(String::from).to_vec());
        }
        other => panic!("expected missing keys, got {other:?}"),
    }
}

#[test]
fn wrong_shape_names_key_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = ldm_tensors("sd15");
    let key = "first_stage_model.decoder.conv_out.weight";
    let expected = tensors[key].dims().to_vec();
    tensors.insert(key.to_string(), Tensor::zeros((3, 32, 1, 1), DType::F16, &Device::Cpu).unwrap());
    let path = write_checkpoint(dir.path(), "wrong_shape.safetensors", &tensors);
    match load_vae(&path, DType::F32, &Device::Cpu) {
        Err(DiffusionError::ShapeMismatch { path: p, mismatches }) => {
            assert_eq!(p, path);
            assert_eq!(mismatches.len(), 1);
            assert_eq!(mismatches[0].key, key);
            assert_eq!(mismatches[0].expected, expected);
            assert_eq!(mismatches[0].found, vec![3, 32, 1, 1]);
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
}

#[test]
fn file_without_a_unet_is_unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let tensors =
        [("foo.weight".to_string(), Tensor::ones(3, DType::F32, &Device::Cpu).unwrap())].into_iter().collect();
    let path = write_checkpoint(dir.path(), "other.safetensors", &tensors);
    let err = load_unet(&path, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, DiffusionError::UnknownArchitecture { .. }), "{err:?}");
    assert!(err.to_string().contains("other.safetensors"), "{err}");
}

#[test]
fn unsupported_config_value_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let unet_dir = dir.path().join("unet");
    std::fs::create_dir(&unet_dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sd15/config.json")).unwrap()).unwrap();
    config["class_embed_type"] = "timestep".into();
    std::fs::write(unet_dir.join("config.json"), config.to_string()).unwrap();
    let err = load_unet(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    match &err {
        DiffusionError::Config { field, path, .. } => {
            assert_eq!(field, "class_embed_type");
            assert!(path.ends_with("unet/config.json"));
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}
