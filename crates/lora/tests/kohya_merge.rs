//! kohya LoRA parsing, name resolution and merging against fixtures from
//! `tools/reference/controlnet_lora_seed.py` (kohya's merge_to, checked there against peft).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use easyphoto_lora::{KohyaLora, KohyaPrefix, LoraError, ModuleIndex, merge_weight};

const TOLERANCE: f32 = 1e-5;

/// The modules of the fixture: (kohya prefix, module path, alpha as stored).
const MODULES: [(KohyaPrefix, &str, Option<f32>); 4] = [
    (KohyaPrefix::Unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", Some(2.0)),
    (KohyaPrefix::Unet, "down_blocks.0.attentions.0.proj_in", None),
    (KohyaPrefix::Unet, "down_blocks.0.resnets.0.conv1", Some(8.0)),
    (KohyaPrefix::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj", Some(0.0)),
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load_lora() -> Result<KohyaLora> {
    Ok(KohyaLora::load(fixture("kohya_lora.safetensors"), &Device::Cpu)?)
}

fn expected() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(fixture("lora_expected.safetensors"), &Device::Cpu)?)
}

/// The fixture's modules among realistic neighbours whose kohya names share prefixes.
fn module_index() -> Result<ModuleIndex> {
    let attn = "down_blocks.0.attentions.0.transformer_blocks.0";
    let mut unet: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .flat_map(|p| [format!("{attn}.attn1.{p}"), format!("{attn}.attn2.{p}")])
        .collect();
    unet.extend(
        [
            "down_blocks.0.attentions.0.proj_in",
            "down_blocks.0.attentions.0.proj_out",
            "down_blocks.0.attentions.1.proj_in",
            "down_blocks.0.resnets.0.conv1",
            "down_blocks.0.resnets.0.conv2",
            "down_blocks.0.resnets.0.time_emb_proj",
            "up_blocks.1.resnets.0.conv1",
        ]
        .map(String::from),
    );
    let te = ["q_proj", "k_proj", "v_proj", "out_proj"].map(|p| format!("text_model.encoder.layers.0.self_attn.{p}"));
    let mut index = ModuleIndex::new();
    index.add(KohyaPrefix::Unet, unet)?;
    index.add(KohyaPrefix::TextEncoder, te)?;
    Ok(index)
}

#[test]
fn parses_every_module_with_rank_and_alpha() -> Result<()> {
    let lora = load_lora()?;
    assert_eq!(lora.len(), MODULES.len());
    for (prefix, path, alpha) in MODULES {
        let name = easyphoto_lora::kohya_name(prefix, path);
        let module = lora.get(&name).with_context(|| name.clone())?;
        assert_eq!(module.rank(), 4, "{name}");
        assert_eq!(module.alpha, alpha, "{name}");
    }
    Ok(())
}

#[test]
fn resolves_kohya_names_to_module_paths() -> Result<()> {
    let lora = load_lora()?;
    let index = module_index()?;
    let mut resolved = vec![];
    for (name, _) in lora.modules() {
        resolved.push(index.resolve(name)?);
    }
    resolved.sort();
    let mut wanted: Vec<_> = MODULES.iter().map(|&(prefix, path, _)| (prefix, path)).collect();
    wanted.sort();
    assert_eq!(resolved, wanted);
    Ok(())
}

#[test]
fn merged_weights_match_kohya() -> Result<()> {
    let lora = load_lora()?;
    let index = module_index()?;
    let expected = expected()?;
    let multiplier: f32 = expected["multiplier"].to_scalar()?;
    assert_eq!(multiplier, 0.7);
    for (name, module) in lora.modules() {
        let (_, path) = index.resolve(name)?;
        let base = &expected[&format!("base.{path}")];
        let want = &expected[&format!("merged.{path}")];
        let merged = merge_weight(base, &module.down, &module.up, module.alpha, multiplier.into())?;
        assert_eq!(merged.dims(), want.dims(), "{path}");
        let err: f32 = (merged - want)?.abs()?.max_all()?.to_scalar()?;
        println!("{path} {:?}: max abs error {err:e}", want.dims());
        assert!(err <= TOLERANCE, "{path}: max abs error {err}");
    }
    Ok(())
}

#[test]
fn truncated_file_names_the_file() -> Result<()> {
    let bytes = std::fs::read(fixture("kohya_lora.safetensors"))?;
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("truncated_lora.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let err = KohyaLora::load(&path, &Device::Cpu).expect_err("truncated file must fail");
    match &err {
        LoraError::NotSafetensors { file, .. } => assert_eq!(file, &path.display().to_string()),
        other => panic!("expected NotSafetensors, got {other:?}"),
    }
    assert!(err.to_string().contains("truncated_lora.safetensors"), "{err}");

    let missing = path.with_file_name("no_such_lora.safetensors");
    match KohyaLora::load(&missing, &Device::Cpu) {
        Err(LoraError::Io { file, .. }) => assert_eq!(file, missing),
        other => panic!("expected Io, got {other:?}"),
    }
    Ok(())
}

/// Writes `tensors` as a safetensors file under the test temp dir and parses it.
fn parse_hand_made(file: &str, tensors: &[(&str, Tensor)]) -> Result<Result<KohyaLora, LoraError>> {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(file);
    let map: HashMap<_, _> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, &path)?;
    Ok(KohyaLora::load(&path, &Device::Cpu))
}

#[test]
fn up_without_down_names_the_module() -> Result<()> {
    let dev = Device::Cpu;
    let module = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let result = parse_hand_made(
        "missing_down.safetensors",
        &[
            (
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
                Tensor::zeros((4, 8, 3, 3), DType::F32, &dev)?,
            ),
            ("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", Tensor::zeros((12, 4, 1, 1), DType::F32, &dev)?),
            (&format!("{module}.lora_up.weight"), Tensor::zeros((12, 4, 1, 1), DType::F32, &dev)?),
            (&format!("{module}.alpha"), Tensor::new(2f32, &dev)?),
        ],
    )?;
    match result {
        Err(LoraError::MissingDown { module: m }) => assert_eq!(m, module),
        other => panic!("expected MissingDown, got {other:?}"),
    }
    Ok(())
}

#[test]
fn rank_mismatch_names_module_and_shapes() -> Result<()> {
    let dev = Device::Cpu;
    let module = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    let result = parse_hand_made(
        "rank_mismatch.safetensors",
        &[
            (&format!("{module}.lora_down.weight"), Tensor::zeros((4, 24), DType::F16, &dev)?),
            (&format!("{module}.lora_up.weight"), Tensor::zeros((16, 8), DType::F16, &dev)?),
        ],
    )?;
    let err = result.expect_err("rank 4 down with rank 8 up must fail");
    match &err {
        LoraError::RankMismatch { module: m, down, up } => {
            assert_eq!(m, module);
            assert_eq!(down, &[4, 24]);
            assert_eq!(up, &[16, 8]);
        }
        other => panic!("expected RankMismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(module) && message.contains("[4, 24]") && message.contains("[16, 8]"));
    Ok(())
}
