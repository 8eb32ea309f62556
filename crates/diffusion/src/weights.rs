//! Checkpoint files as a `VarBuilder` backend: memory-mapped safetensors (one file or shards)
//! and zip-pickle `.ckpt` / `.pth` / `.bin`, with key renaming and complete error reports.
//!
//! Building a model through [`Weights::var_builder`] never stops at the first problem: missing
//! keys and wrong shapes are collected (zeros stand in), and [`Weights::check`] turns them
//! into one [`DiffusionError`] that lists them all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::error::{DiffusionError, Result, ShapeMismatch};

enum Store {
    Safetensors(MmapedSafetensors),
    Pickle(PthTensors),
}

/// The tensors of one checkpoint (possibly several shard files).
pub struct Weights {
    path: PathBuf,
    store: Store,
    shapes: HashMap<String, Vec<usize>>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights").field("path", &self.path).field("tensors", &self.shapes.len()).finish()
    }
}

impl Weights {
    /// Opens a `.safetensors` file (memory-mapped) or a zip-pickle `.ckpt` / `.pth` / `.pt` /
    /// `.bin` (its `state_dict` entry when there is one).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if is_safetensors(path) { Self::open_shards(path, &[path.to_path_buf()]) } else { Self::open_pickle(path) }
    }

    /// Opens several safetensors shards as one checkpoint; `name` is used in error messages.
    pub fn open_shards(name: &Path, shards: &[PathBuf]) -> Result<Self> {
        for shard in shards {
            std::fs::metadata(shard).map_err(|source| DiffusionError::Io { path: shard.clone(), source })?;
        }
        // SAFETY: the files are mapped read-only; like every mmap user we rely on them not being
        // truncated by another process while mapped.
        let st = unsafe { MmapedSafetensors::multi(shards) }
            .map_err(|source| DiffusionError::Checkpoint { path: name.to_path_buf(), source })?;
        let shapes = st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
        Ok(Self { path: name.to_path_buf(), store: Store::Safetensors(st), shapes })
    }

    fn open_pickle(path: &Path) -> Result<Self> {
        std::fs::metadata(path).map_err(|source| DiffusionError::Io { path: path.to_path_buf(), source })?;
        let pth = PthTensors::new(path, Some("state_dict"))
            .or_else(|_| PthTensors::new(path, None))
            .map_err(|source| DiffusionError::Checkpoint { path: path.to_path_buf(), source })?;
        let shapes = pth.tensor_infos().iter().map(|(k, v)| (k.clone(), v.layout.shape().dims().to_vec())).collect();
        Ok(Self { path: path.to_path_buf(), store: Store::Pickle(pth), shapes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every stored key with its shape.
    pub fn shapes(&self) -> &HashMap<String, Vec<usize>> {
        &self.shapes
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.shapes.get(key).map(Vec::as_slice)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.shapes.contains_key(key)
    }

    /// Loads one stored tensor as it is.
    pub fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        let loaded = match &self.store {
            Store::Safetensors(st) => st.load(key, device),
            Store::Pickle(pth) => match pth.get(key) {
                Ok(Some(t)) => t.to_device(device),
                Ok(None) => Err(candle_core::Error::CannotFindTensor { path: key.to_string() }),
                Err(e) => Err(e),
            },
        };
        loaded.map_err(|source| DiffusionError::Checkpoint { path: self.path.clone(), source })
    }

    /// A `VarBuilder` whose requested (diffusers) names are mapped to stored keys by `rename`.
    /// Call [`Weights::check`] with the returned report after building the model.
    pub fn var_builder(
        self: &Arc<Self>,
        rename: impl Fn(&str) -> String + Send + Sync + 'static,
        dtype: DType,
        device: &Device,
    ) -> (VarBuilder<'static>, LoadReport) {
        let report = LoadReport::default();
        let backend = Backend { weights: self.clone(), rename: Box::new(rename), report: report.clone() };
        (VarBuilder::from_backend(Box::new(backend), dtype, device.clone()), report)
    }

    /// Turns the problems collected while building into an error naming this checkpoint.
    pub fn check(&self, report: &LoadReport) -> Result<()> {
        let problems = report.0.lock().map_err(|_| DiffusionError::input("weights", "poisoned lock".to_string()))?;
        if !problems.missing.is_empty() {
            let mut keys = problems.missing.clone();
            keys.sort();
            keys.dedup();
            return Err(DiffusionError::MissingKeys { path: self.path.clone(), keys });
        }
        if !problems.mismatched.is_empty() {
            return Err(DiffusionError::ShapeMismatch {
                path: self.path.clone(),
                mismatches: problems.mismatched.clone(),
            });
        }
        Ok(())
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

#[derive(Debug, Default)]
struct Problems {
    missing: Vec<String>,
    mismatched: Vec<ShapeMismatch>,
}

/// The problems found while a model was built from a [`Weights`] `VarBuilder`.
#[derive(Debug, Default, Clone)]
pub struct LoadReport(Arc<Mutex<Problems>>);

struct Backend {
    weights: Arc<Weights>,
    rename: Box<dyn Fn(&str) -> String + Send + Sync>,
    report: LoadReport,
}

/// Whether two shapes differ only by trailing unit dimensions (`[C, C, 1, 1]` and `[C, C]`).
fn same_but_unit_dims(a: &[usize], b: &[usize]) -> bool {
    let trim = |s: &[usize]| s.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    a[..trim(a)] == b[..trim(b)]
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let key = (self.rename)(name);
        let mut problems = self.report.0.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
        let Some(found) = self.weights.shape(&key) else {
            problems.missing.push(key);
            return Tensor::zeros(shape, dtype, dev);
        };
        if found != shape.dims() && !same_but_unit_dims(found, shape.dims()) {
            problems.mismatched.push(ShapeMismatch { key, expected: shape.dims().to_vec(), found: found.to_vec() });
            return Tensor::zeros(shape, dtype, dev);
        }
        drop(problems);
        let tensor = self.weights.load(&key, dev).map_err(candle_core::Error::wrap)?;
        tensor.reshape(shape)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let key = (self.rename)(name);
        self.weights.load(&key, dev).map_err(candle_core::Error::wrap)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains(&(self.rename)(name))
    }
}

/// A `VarBuilder` that makes up weights of the right shapes (normal, std `1/√fan_in`), for
/// benchmarks and smoke tests of full-size configs without a checkpoint.
pub fn random_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let fan_in = shape.dims().iter().skip(1).product::<usize>().max(1);
        Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, shape, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
