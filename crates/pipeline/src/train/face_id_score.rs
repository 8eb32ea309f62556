//! Face-identity scores of the validation images (EasyPhoto's `eval_jpg_with_faceid`, anatomy
//! §1.6): the embedding of each validation image's face against every training face,
//! `score = mean_j dot(e_val, e_train_j)` (all training faces, not the top 10 the names suggest).
//! The face of an image is its most confident detection; an image without one has no score.

use std::path::PathBuf;

use easyphoto_face::{Face, FaceDetector, FaceEmbedder};
use image::RgbImage;

use crate::error::Result;
use crate::progress::{CancelToken, Observer, Progress};

/// Progress stage of this step (one step per validation image).
pub const STAGE: &str = "face_id_score";

/// One validation image and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub step: u32,
    pub template: usize,
    pub path: PathBuf,
    /// `None` when no face was found in the image.
    pub score: Option<f32>,
}

/// The embedding of the most confident face of `image`, if there is one.
pub fn face_embedding(
    image: &RgbImage,
    detector: &dyn FaceDetector,
    embedder: &dyn FaceEmbedder,
) -> Result<Option<Vec<f32>>> {
    let faces = detector.detect(image)?;
    let best = faces.iter().copied().max_by(|a: &Face, b: &Face| a.score.total_cmp(&b.score));
    Ok(match best {
        Some(face) => Some(embedder.embed(image, &face)?),
        None => None,
    })
}

/// `mean_j dot(embedding, references[j])`; `None` without references.
pub fn identity_score(embedding: &[f32], references: &[Vec<f32>]) -> Option<f32> {
    if references.is_empty() {
        return None;
    }
    let sum: f64 = references
        .iter()
        .map(|r| r.iter().zip(embedding).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>())
        .sum();
    Some((sum / references.len() as f64) as f32)
}

/// Scores `images` (`(step, template, path)`) against the faces of the training `crops`.
pub fn score_validation(
    crops: &[RgbImage],
    images: &[(u32, usize, PathBuf)],
    detector: &dyn FaceDetector,
    embedder: &dyn FaceEmbedder,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<Vec<Scored>> {
    let mut references = Vec::with_capacity(crops.len());
    for crop in crops {
        cancel.check(STAGE)?;
        references.extend(face_embedding(crop, detector, embedder)?);
    }
    let total = Some(images.len() as u64);
    let mut scored = Vec::with_capacity(images.len());
    for (n, (step, template, path)) in images.iter().enumerate() {
        cancel.check(STAGE)?;
        let image = easyphoto_face::load_rgb(path)?;
        let score = face_embedding(&image, detector, embedder)?.and_then(|e| identity_score(&e, &references));
        scored.push(Scored { step: *step, template: *template, path: path.clone(), score });
        observer.progress(Progress { stage: STAGE, step: n as u64 + 1, total, message: "" });
    }
    Ok(scored)
}
