//! diffusers folders in the shapes users meet: sharded weights with an index, `.fp16` variants,
//! bf16 weights, pipeline folders (`<dir>/unet`, `<dir>/vae`) and pre-0.14 VAE attention names.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, io};
use easyphoto_diffusion::{diffusers_folder, load_unet, load_vae};

fn copy_config(from: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(fixtures().join(from).join("config.json"), to.join("config.json")).unwrap();
}

fn weights(model: &str) -> HashMap<String, Tensor> {
    io(&format!("{model}/diffusion_pytorch_model.safetensors"))
}

#[test]
fn sharded_fp16_variant_matches() {
    let dir = tempfile::tempdir().unwrap();
    copy_config("sd15", dir.path());
    let mut keys: Vec<String> = weights("sd15").into_keys().collect();
    keys.sort();
    let all = weights("sd15");
    let (first, second) = keys.split_at(keys.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let name = format!("diffusion_pytorch_model-0000{}-of-00002.fp16.safetensors", i + 1);
        let tensors: HashMap<_, _> = part.iter().map(|k| (k.clone(), all[k].clone())).collect();
        candle_core::safetensors::save(&tensors, dir.path().join(&name)).unwrap();
        for k in part.iter() {
            weight_map.insert(k.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.path().join("diffusion_pytorch_model.safetensors.index.fp16.json"), index.to_string()).unwrap();

    let unet = diffusers_folder::load_unet(dir.path(), Some("fp16"), DType::F32, &Device::Cpu).unwrap();
    let io = io("sd15/io.safetensors");
    let out = unet.forward(&io["sample"], &io["timestep"], &io["encoder_hidden_states"], &Default::default()).unwrap();
    assert_close("sharded sd15", &out, &io["out"], 1e-4);
}

#[test]
fn pipeline_folder_with_bf16_weights_loads() {
    let dir = tempfile::tempdir().unwrap();
    copy_config("sd15", &dir.path().join("unet"));
    let bf16: HashMap<_, _> = weights("sd15").into_iter().map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap())).collect();
    candle_core::safetensors::save(&bf16, dir.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let unet = load_unet(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let io = io("sd15/io.safetensors");
    let out = unet.forward(&io["sample"], &io["timestep"], &io["encoder_hidden_states"], &Default::default()).unwrap();
    // bf16 keeps 8 bits of mantissa: the output moves, but stays near the f16-weight reference.
    let err = common::max_abs_diff(&out, &io["out"]);
    assert!(err > 0.0 && err < 0.1, "bf16 error {err}");
}

#[test]
fn legacy_vae_attention_names_load() {
    let dir = tempfile::tempdir().unwrap();
    copy_config("vae", &dir.path().join("vae"));
    let renamed: HashMap<_, _> = weights("vae")
        .into_iter()
        .map(|(k, v)| {
            let k = k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.");
            (k.replace(".to_out.0.", ".proj_attn."), v)
        })
        .collect();
    assert!(renamed.keys().any(|k| k.contains(".proj_attn.")));
    candle_core::safetensors::save(&renamed, dir.path().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let vae = load_vae(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let io = io("vae/io.safetensors");
    assert_close("legacy vae decode", &vae.decode(&io["latent"]).unwrap(), &io["decoded"], 1e-4);
}
