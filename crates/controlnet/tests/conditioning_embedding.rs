//! `ControlNetConditioningEmbedding` against diffusers, with fixtures from
//! `tools/reference/controlnet_lora_seed.py`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use easyphoto_controlnet::{
    ControlNetConditioningEmbedding, ControlNetConditioningEmbeddingConfig, ControlNetError, DIFFUSERS_PREFIX,
    original_hint_key_to_diffusers,
};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(name: &str) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).with_context(|| name.to_string())
}

/// The fixture's config: 3 -> (4, 8, 8, 16) -> 32.
fn config() -> ControlNetConditioningEmbeddingConfig {
    ControlNetConditioningEmbeddingConfig {
        conditioning_embedding_channels: 32,
        block_out_channels: vec![4, 8, 8, 16],
        conditioning_channels: 3,
    }
}

fn build(weights: HashMap<String, Tensor>) -> Result<ControlNetConditioningEmbedding, ControlNetError> {
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    ControlNetConditioningEmbedding::new(&config(), vb.pp(DIFFUSERS_PREFIX))
}

/// Max abs difference between the module's output on the fixture input and diffusers' output.
fn error_vs_diffusers(module: &ControlNetConditioningEmbedding) -> Result<f32> {
    let io = load("cond_embedding_io.safetensors")?;
    let output = module.forward(&io["input"])?;
    let expected = &io["output"];
    assert_eq!(output.dims(), expected.dims());
    assert_eq!(output.dims(), &[2, 32, 5, 3]);
    Ok((output - expected)?.abs()?.max_all()?.to_scalar()?)
}

#[test]
fn diffusers_layout_matches_diffusers() -> Result<()> {
    let module = build(load("cond_embedding_diffusers.safetensors")?)?;
    let err = error_vs_diffusers(&module)?;
    println!("diffusers layout: max abs error {err:e}");
    assert!(err <= TOLERANCE, "max abs error {err}");
    Ok(())
}

#[test]
fn original_layout_matches_diffusers() -> Result<()> {
    let mut renamed = HashMap::new();
    for (key, tensor) in load("cond_embedding_original.safetensors")? {
        let new_key = original_hint_key_to_diffusers(&key, &config())?
            .with_context(|| format!("{key} is not a hint-encoder key"))?;
        renamed.insert(new_key, tensor);
    }
    let module = build(renamed)?;
    let err = error_vs_diffusers(&module)?;
    println!("original layout: max abs error {err:e}");
    assert!(err <= TOLERANCE, "max abs error {err}");
    Ok(())
}

#[test]
fn missing_weight_names_the_key() -> Result<()> {
    let mut weights = load("cond_embedding_diffusers.safetensors")?;
    let key = "controlnet_cond_embedding.blocks.3.bias";
    weights.remove(key).context("fixture lacks the key")?;
    match build(weights) {
        Err(ControlNetError::MissingWeight { key: k }) => assert_eq!(k, key),
        other => panic!("expected MissingWeight, got {other:?}"),
    }
    Ok(())
}

#[test]
fn wrong_shape_names_key_expected_and_found() -> Result<()> {
    let mut weights = load("cond_embedding_diffusers.safetensors")?;
    let key = "controlnet_cond_embedding.conv_out.weight";
    weights.insert(key.to_string(), Tensor::zeros((32, 16, 1, 1), DType::F32, &Device::Cpu)?);
    let err = build(weights).expect_err("a 1x1 conv_out must be rejected");
    match &err {
        ControlNetError::ShapeMismatch { key: k, expected, found } => {
            assert_eq!(k, key);
            assert_eq!(expected, &[32, 16, 3, 3]);
            assert_eq!(found, &[32, 16, 1, 1]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(key) && message.contains("[32, 16, 3, 3]"), "{message}");
    Ok(())
}

#[test]
fn empty_block_out_channels_is_a_config_error() {
    let config = ControlNetConditioningEmbeddingConfig { block_out_channels: Vec::new(), ..config() };
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    match ControlNetConditioningEmbedding::new(&config, vb) {
        Err(ControlNetError::InvalidConfig { field, .. }) => {
            assert_eq!(field, "block_out_channels")
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}
