//! EasyPhoto's preprocessing (`preprocess.py`, anatomy §1.3): per photo the left-most face, its
//! roll score, its identity embedding and its 3× crop; the identity ranking keeps the top 15
//! and picks the reference photo (roll × identity); each kept crop is re-detected, and its
//! salient pixels inside the widened face box are kept on white.
//!
//! Photos without a face are skipped, as EasyPhoto does; if none is left, a typed error names
//! them. The embedding is taken on the whole photo from the face that is cropped.

use std::path::PathBuf;

use easyphoto_face::geometry::{crop, expand_box, left_to_right, roll_score};
use easyphoto_face::masks::{on_white, training_mask};
use easyphoto_face::ranking::rank_photos;
use easyphoto_face::{Face, FaceDetector, FaceEmbedder, Segmenter};
use image::RgbImage;

use crate::config::TrainConfig;
use crate::error::{PipelineError, Result};
use crate::progress::{CancelToken, Observer, Progress};

/// Progress stage of this step (one step per photo, then one per kept crop).
pub const STAGE: &str = "preprocess";

/// The outcome of preprocessing; indices refer to the photos given.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// The training crops on white, best identity score first.
    pub crops: Vec<RgbImage>,
    /// The photo each crop comes from.
    pub kept: Vec<usize>,
    /// The reference photo (`ref_image.jpg`).
    pub reference: usize,
    /// Photos in which no face was found.
    pub no_face: Vec<usize>,
    /// `(photo, id_score)` of every photo with a face.
    pub id_scores: Vec<(usize, f32)>,
}

/// The face EasyPhoto takes from an image: the left-most by its `ratio`-expanded box, with that box.
pub fn left_most(faces: &[Face], ratio: f64, width: u32, height: u32) -> Option<(Face, [i32; 4])> {
    let boxes: Vec<[i32; 4]> = faces.iter().map(|f| expand_box(f.bbox.map(f64::from), ratio, width, height)).collect();
    left_to_right(&boxes).first().map(|&i| (faces[i], boxes[i]))
}

/// Runs the preprocessing of `photos` (`names` name them in errors).
#[allow(clippy::too_many_arguments)]
pub fn preprocess(
    photos: &[RgbImage],
    names: &[PathBuf],
    config: &TrainConfig,
    detector: &dyn FaceDetector,
    embedder: &dyn FaceEmbedder,
    segmenter: &dyn Segmenter,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<Preprocessed> {
    let total = Some(photos.len() as u64);
    let (mut candidates, mut embeddings, mut rolls, mut crops3, mut no_face) = (vec![], vec![], vec![], vec![], vec![]);
    for (i, photo) in photos.iter().enumerate() {
        cancel.check(STAGE)?;
        let faces = detector.detect(photo)?;
        match left_most(&faces, config.crop_ratio, photo.width(), photo.height()) {
            None => no_face.push(i),
            Some((face, bx)) => {
                candidates.push(i);
                rolls.push(roll_score(&face.landmarks));
                embeddings.push(embedder.embed(photo, &face)?);
                crops3.push(crop(photo, bx));
            }
        }
        observer.progress(Progress { stage: STAGE, step: i as u64 + 1, total, message: "faces" });
    }
    let too_few = |found: usize, skipped: &[usize]| PipelineError::TooFewFaces {
        path: names.first().and_then(|p| p.parent()).map(PathBuf::from).unwrap_or_default(),
        found,
        minimum: 1,
        skipped: skipped.iter().map(|&i| names[i].clone()).collect(),
    };
    if candidates.is_empty() {
        return Err(too_few(0, &no_face));
    }
    let ranking = rank_photos(&embeddings, &rolls, config.max_training_photos as usize)?;

    let mut out = Preprocessed {
        crops: vec![],
        kept: vec![],
        reference: candidates[ranking.reference],
        no_face,
        id_scores: candidates.iter().copied().zip(ranking.id_scores.iter().copied()).collect(),
    };
    let total = Some(ranking.selected.len() as u64);
    for (n, &j) in ranking.selected.iter().enumerate() {
        cancel.check(STAGE)?;
        let sub = &crops3[j];
        let faces = detector.detect(sub)?;
        if let Some((_, face_box)) = left_most(&faces, 1.0, sub.width(), sub.height()) {
            let saliency = segmenter.segment(sub)?;
            if let Some(white) = on_white(sub, &training_mask(&saliency, face_box))? {
                out.crops.push(white);
                out.kept.push(candidates[j]);
            }
        }
        observer.progress(Progress { stage: STAGE, step: n as u64 + 1, total, message: "crops" });
    }
    if out.crops.is_empty() {
        let dropped: Vec<usize> =
            out.no_face.iter().copied().chain(ranking.selected.iter().map(|&j| candidates[j])).collect();
        return Err(too_few(0, &dropped));
    }
    Ok(out)
}
