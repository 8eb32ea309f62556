//! Reading the safetensors fixtures written by `tools/reference/face_image_*.py`.

#![allow(dead_code)] // each test file uses part of it

use std::path::{Path, PathBuf};

use anyhow::Context;
use safetensors::{Dtype, SafeTensors};

/// A file under `crates/face/tests/`.
pub fn test_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(relative)
}

/// A tensor of a fixture file: its shape and its values widened to f64.
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Tensor {
    /// The values as u8 (for tensors stored as U8).
    pub fn u8s(&self) -> Vec<u8> {
        self.values.iter().map(|&v| v as u8).collect()
    }

    /// The values as f32.
    pub fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
}

/// All tensors of `tests/fixtures/<file>`.
pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(file: &str) -> anyhow::Result<Self> {
        let path = test_path(&format!("fixtures/{file}"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Self { bytes })
    }

    pub fn names(&self) -> anyhow::Result<Vec<String>> {
        Ok(SafeTensors::deserialize(&self.bytes)?.names().into_iter().map(String::from).collect())
    }

    pub fn get(&self, name: &str) -> anyhow::Result<Tensor> {
        let tensors = SafeTensors::deserialize(&self.bytes)?;
        let view = tensors.tensor(name).with_context(|| format!("fixture tensor {name}"))?;
        let data = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::U8 => data.iter().map(|&v| f64::from(v)).collect(),
            Dtype::I32 => data.chunks_exact(4).map(|b| f64::from(i32::from_le_bytes(b.try_into().unwrap()))).collect(),
            Dtype::I64 => data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            Dtype::F32 => data.chunks_exact(4).map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap()))).collect(),
            Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
            other => anyhow::bail!("{name}: unsupported dtype {other:?}"),
        };
        Ok(Tensor { shape: view.shape().to_vec(), values })
    }
}
