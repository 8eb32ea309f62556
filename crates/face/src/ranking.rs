//! EasyPhoto's choice of training photos (`preprocess.py`): identity scores against the mean
//! embedding, the reference photo, and the photos kept for training.

use crate::FaceError;

/// How many photos EasyPhoto keeps for training.
pub const TRAINING_PHOTOS: usize = 15;

/// The outcome of [`rank_photos`]; indices refer to the input order.
#[derive(Debug, Clone, PartialEq)]
pub struct PhotoRanking {
    /// `dot(embedding, pivot)` per photo, the pivot being the mean embedding (not normalised).
    pub id_scores: Vec<f32>,
    /// The reference photo: the largest `roll_score × id_score` (EasyPhoto copies it to `ref_image.jpg`).
    pub reference: usize,
    /// The photos kept, best identity score first: at most `keep` of them.
    pub selected: Vec<usize>,
}

/// Ranks photos by identity as `compare_jpg_with_face_id` and its caller do: `pivot` is the mean of
/// the embeddings (f32, row by row as numpy reduces), `id_score = dot(embedding, pivot)`, the
/// reference photo is the argmax of `roll_scores[i] × id_score[i]` and the `keep` best identity
/// scores are selected ([`TRAINING_PHOTOS`] in EasyPhoto). There is no threshold: outliers are
/// only dropped by the cut. Equal scores rank the later photo first, as `argsort(..)[::-1]` does.
///
/// `roll_scores` come from [`roll_score`](crate::geometry::roll_score). Errors if there are no
/// embeddings, their lengths differ, or `roll_scores` has another length.
pub fn rank_photos(embeddings: &[Vec<f32>], roll_scores: &[f64], keep: usize) -> Result<PhotoRanking, FaceError> {
    let invalid = |what: String| Err(FaceError::InvalidInput { what });
    let Some(dim) = embeddings.first().map(Vec::len) else {
        return invalid("rank_photos: no embeddings".into());
    };
    if let Some(i) = embeddings.iter().position(|e| e.len() != dim) {
        return invalid(format!(
            "rank_photos: embedding {i} has {} values, embedding 0 has {dim}",
            embeddings[i].len()
        ));
    }
    if roll_scores.len() != embeddings.len() {
        return invalid(format!("rank_photos: {} roll scores for {} embeddings", roll_scores.len(), embeddings.len()));
    }

    let mut pivot = vec![0f32; dim];
    for e in embeddings {
        pivot.iter_mut().zip(e).for_each(|(p, v)| *p += v);
    }
    let n = embeddings.len() as f32;
    pivot.iter_mut().for_each(|p| *p /= n);
    let id_scores: Vec<f32> = embeddings
        .iter()
        .map(|e| e.iter().zip(&pivot).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() as f32)
        .collect();

    let descending = |key: &dyn Fn(usize) -> f64| {
        let mut order: Vec<usize> = (0..id_scores.len()).collect();
        order.sort_by(|&a, &b| key(a).total_cmp(&key(b)));
        order.reverse();
        order
    };
    let total = |i: usize| roll_scores[i] * f64::from(id_scores[i]);
    let reference = descending(&total)[0];
    let mut selected = descending(&|i| f64::from(id_scores[i]));
    selected.truncate(keep);
    Ok(PhotoRanking { id_scores, reference, selected })
}
