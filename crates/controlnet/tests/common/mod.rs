//! Helpers shared by the ControlNet tests: fixture paths and tensor comparison.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The diffusion crate's fixtures (the tiny UNets and VAEs the ControlNets belong to).
pub fn diffusion_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffusion/tests/fixtures")
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

/// Asserts `ours` within `tol` of `reference` (which must be large enough to mean something);
/// returns the error.
pub fn assert_close(name: &str, ours: &Tensor, reference: &Tensor, tol: f32) -> f32 {
    let err = max_abs_diff(ours, reference);
    let scale = max_abs(reference);
    assert!(err <= tol, "{name}: max abs error {err:e} > {tol:e} (reference max |x| {scale})");
    assert!(scale > 10.0 * tol, "{name}: reference is too small to be a meaningful check");
    err
}
