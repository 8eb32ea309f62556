//! ArcFace identity embeddings (insightface's `w600k_r50.onnx` of buffalo_l, and other
//! `arcface_onnx.py` models), run as insightface 2.1 runs them: the `norm_crop` crop in RGB,
//! `(v − mean) / std`, the model's single output L2-normalised (`Face.normed_embedding`).

use std::path::Path;

use image::RgbImage;
use ndarray::Array4;

use crate::detector::{FaceEmbedder, l2_normalize};
use crate::{FaceError, Input, OnnxModel};

/// Input normalisation. insightface uses mean 127.5 / std 127.5 (w600k_r50 and the other model-pack
/// recognisers), or 0 / 1 for graphs that start with their own `Sub` and `Mul` nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArcFaceConfig {
    /// Subtracted from each 0..255 value.
    pub input_mean: f32,
    /// Divisor after the subtraction.
    pub input_std: f32,
}

impl Default for ArcFaceConfig {
    fn default() -> Self {
        Self { input_mean: 127.5, input_std: 127.5 }
    }
}

/// Crops per model run: larger batches run slower per crop on the CPU.
pub const BATCH: usize = 8;

/// An ArcFace-style recogniser: input `[N, 3, S, S]`, one output `[N, D]`.
#[derive(Debug)]
pub struct ArcFace {
    model: OnnxModel,
    input: String,
    size: u32,
    config: ArcFaceConfig,
}

impl ArcFace {
    /// Loads a recogniser with the default normalisation.
    pub fn load(path: impl AsRef<Path>, threads: usize) -> Result<Self, FaceError> {
        Self::load_with(path, ArcFaceConfig::default(), threads)
    }

    /// Loads a recogniser with custom normalisation.
    pub fn load_with(path: impl AsRef<Path>, config: ArcFaceConfig, threads: usize) -> Result<Self, FaceError> {
        let path = path.as_ref();
        let model = OnnxModel::load(path, threads)?;
        let unsupported = |reason: String| FaceError::UnsupportedModel { path: path.to_path_buf(), reason };
        let (input, shape) = model.inputs().first().cloned().ok_or_else(|| unsupported("no input".into()))?;
        let size = match shape.as_slice() {
            [_, 3, h, w] if h == w && *h > 0 => *h as u32,
            other => return Err(unsupported(format!("input shape {other:?}, expected [N, 3, S, S]"))),
        };
        if model.outputs().len() != 1 {
            return Err(unsupported(format!("{} outputs, expected 1", model.outputs().len())));
        }
        Ok(Self { model, input, size, config })
    }
}

impl FaceEmbedder for ArcFace {
    fn input_size(&self) -> u32 {
        self.size
    }

    fn embed_aligned(&self, crop: &RgbImage) -> Result<Vec<f32>, FaceError> {
        let mut out = self.embed_aligned_batch(std::slice::from_ref(crop))?;
        Ok(out.remove(0))
    }

    /// Model runs on batches of up to [`BATCH`] crops (insightface runs them one at a time, with
    /// the same per-crop results).
    fn embed_aligned_batch(&self, crops: &[RgbImage]) -> Result<Vec<Vec<f32>>, FaceError> {
        if crops.len() > BATCH {
            let mut out = Vec::with_capacity(crops.len());
            for chunk in crops.chunks(BATCH) {
                out.extend(self.embed_aligned_batch(chunk)?);
            }
            return Ok(out);
        }
        let s = self.size as usize;
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(bad) = crops.iter().find(|c| c.dimensions() != (self.size, self.size)) {
            return Err(FaceError::BadShape {
                name: self.input.clone(),
                expected: vec![1, 3, s as i64, s as i64],
                found: vec![1, 3, bad.height() as usize, bad.width() as usize],
            });
        }
        // cv2.dnn.blobFromImages: subtract the mean, then multiply by the f32 scale factor.
        let (mean, scale) = (self.config.input_mean, (1.0 / f64::from(self.config.input_std)) as f32);
        let mut blob = Array4::zeros((crops.len(), 3, s, s));
        let data = blob.as_slice_mut().expect("a new array is contiguous");
        for (planes, crop) in data.chunks_exact_mut(3 * s * s).zip(crops) {
            for (c, plane) in planes.chunks_exact_mut(s * s).enumerate() {
                for (v, px) in plane.iter_mut().zip(crop.as_raw().chunks_exact(3)) {
                    *v = (f32::from(px[c]) - mean) * scale;
                }
            }
        }
        let out = self.model.run(&[(self.input.as_str(), Input::from(&blob))])?;
        let embeddings = out.into_values().next().expect("one output, checked at load");
        let dim = embeddings.len() / crops.len();
        let flat: Vec<f32> = embeddings.into_iter().collect();
        Ok(flat.chunks_exact(dim).map(|e| l2_normalize(e.to_vec())).collect())
    }
}
