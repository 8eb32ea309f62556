//! Helpers shared by the parity tests: fixture paths, tensor comparison, and the assembly of
//! single-file LDM checkpoints from the reference's key lists.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tensors of `tests/fixtures/<name>`.
pub fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).expect(name)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn assert_close(name: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let err = max_abs_diff(ours, reference);
    let scale = max_abs(reference);
    assert!(err <= tol, "{name}: max abs error {err:e} > {tol:e} (reference max |x| {scale})");
    assert!(scale > 10.0 * tol, "{name}: reference is too small to be a meaningful check");
}

/// The LDM-layout tensors described by `tests/fixtures/<model>.ldm_keys.json`: entries
/// `[ldm_key, source_folder, diffusers_key, ldm_shape]` written by `tools/reference`.
pub fn ldm_tensors(model: &str) -> HashMap<String, Tensor> {
    let text = std::fs::read_to_string(fixtures().join(format!("{model}.ldm_keys.json"))).unwrap();
    let entries: Vec<(String, String, String, Vec<usize>)> = serde_json::from_str(&text).unwrap();
    let mut folders: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    let mut out = HashMap::new();
    for (ldm_key, folder, key, shape) in entries {
        let tensors = folders.entry(folder.clone()).or_insert_with(|| {
            let file = ["diffusion_pytorch_model.safetensors", "model.safetensors"]
                .into_iter()
                .find(|f| fixtures().join(&folder).join(f).exists())
                .unwrap_or_else(|| panic!("{folder}: no weights"));
            io(&format!("{folder}/{file}"))
        });
        let t = tensors.get(&key).unwrap_or_else(|| panic!("{folder}: no {key}"));
        out.insert(ldm_key, t.reshape(shape).unwrap());
    }
    out
}

/// Writes `tensors` as a safetensors file in `dir` and returns its path.
pub fn write_checkpoint(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}
