//! Reading the safetensors fixtures of `tools/reference/face_*.py` and the test photos.

#![allow(dead_code)] // each test file uses part of it

use std::path::{Path, PathBuf};

use anyhow::Context;
use safetensors::{Dtype, SafeTensors};

/// A file under `crates/face/tests/assets/`.
pub fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/assets").join(name)
}

/// A MediaPipe model the crate embeds (`assets/mediapipe`).
pub fn mediapipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mediapipe").join(name)
}

/// A photo of `tests/assets` as 8-bit RGB.
pub fn photo(name: &str) -> anyhow::Result<image::RgbImage> {
    let path = asset(name);
    Ok(image::open(&path).with_context(|| format!("decoding {}", path.display()))?.to_rgb8())
}

/// The tensors of one fixture file, values widened to f64.
pub struct Fixture(Vec<u8>);

impl Fixture {
    /// Opens `crates/face/tests/fixtures/<file>`.
    pub fn open(file: &str) -> anyhow::Result<Self> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(file);
        Ok(Self(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?))
    }

    /// Whether the fixture has a tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.0).map(|t| t.tensor(name).is_ok()).unwrap_or(false)
    }

    /// A tensor's shape and values.
    pub fn get(&self, name: &str) -> anyhow::Result<(Vec<usize>, Vec<f64>)> {
        let tensors = SafeTensors::deserialize(&self.0)?;
        let view = tensors.tensor(name).with_context(|| format!("fixture tensor {name}"))?;
        let data = view.data();
        let values = match view.dtype() {
            Dtype::U8 => data.iter().map(|&v| f64::from(v)).collect(),
            Dtype::I64 => data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            Dtype::F32 => data.chunks_exact(4).map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap()))).collect(),
            Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
            other => anyhow::bail!("{name}: unsupported dtype {other:?}"),
        };
        Ok((view.shape().to_vec(), values))
    }

    /// A tensor's values as f32.
    pub fn f32s(&self, name: &str) -> anyhow::Result<Vec<f32>> {
        Ok(self.get(name)?.1.into_iter().map(|v| v as f32).collect())
    }

    /// A u8 tensor's values.
    pub fn u8s(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self.get(name)?.1.into_iter().map(|v| v as u8).collect())
    }
}

/// Largest absolute difference, and how many elements differ at all.
pub fn max_abs_diff_u8(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).fold((0, 0), |(m, n), (x, y)| (m.max(x.abs_diff(*y)), n + usize::from(x != y)))
}

/// Largest absolute difference of two f32 slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
