//! The user's final LoRA (EasyPhoto's `merge_from_name_and_index`, anatomy §1.6): the validation
//! images sorted by face-identity score, the best `top_merge` (10) kept, and the checkpoints of
//! their steps averaged element-wise (down, up and alpha separately; a step that appears several
//! times counts several times) into `best_outputs/<id>.safetensors` (f16), with the best image
//! as `best_outputs/face_id.jpg`.
//!
//! Fallbacks, as EasyPhoto's: without any scored image, the last checkpoint and the latest
//! validation image; without validation images, the last checkpoint and the best training crop.

use std::path::{Path, PathBuf};

use candle_core::DType;
use easyphoto_lora::{KohyaLora, average_elementwise};
use image::RgbImage;
use image::codecs::jpeg::JpegEncoder;

use super::face_id_score::Scored;
use crate::error::{PipelineError, Result};
use crate::user::{UserId, UserStore, write_atomic};

/// What the fusion chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    /// The steps averaged, best image first (repeats weight a checkpoint).
    pub steps: Vec<u32>,
    /// The score of the best face image, when it has one.
    pub best_score: Option<f32>,
}

/// The `checkpoint-<step>.safetensors` files of `dir`, by step.
pub fn checkpoints(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let read = |source| PipelineError::Read { path: dir.to_path_buf(), source };
    let mut found = vec![];
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|r| r.strip_suffix(".safetensors"))
            && let Ok(step) = step.parse::<u32>()
        {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The scored images, best first (equal scores keep their order), at most `top_merge`.
pub fn top_scored(scores: &[Scored], top_merge: usize) -> Vec<&Scored> {
    let mut scored: Vec<&Scored> = scores.iter().filter(|s| s.score.is_some()).collect();
    scored.sort_by(|a, b| b.score.unwrap_or(f32::MIN).total_cmp(&a.score.unwrap_or(f32::MIN)));
    scored.truncate(top_merge);
    scored
}

/// The element-wise mean of the checkpoints of `steps` (with repeats).
pub fn average_checkpoints(checkpoints: &[(u32, PathBuf)], steps: &[u32]) -> Result<KohyaLora> {
    let mut loaded: Vec<(u32, KohyaLora)> = vec![];
    for &step in steps {
        if loaded.iter().all(|(s, _)| *s != step) {
            let path = checkpoints.iter().find(|(s, _)| *s == step).map(|(_, p)| p).ok_or_else(|| {
                PipelineError::InvalidInput {
                    path: format!("checkpoint-{step}.safetensors").into(),
                    reason: "missing".into(),
                }
            })?;
            loaded.push((step, KohyaLora::load(path, &candle_core::Device::Cpu)?));
        }
    }
    let refs: Vec<&KohyaLora> =
        steps.iter().filter_map(|step| loaded.iter().find(|(s, _)| s == step).map(|(_, l)| l)).collect();
    Ok(average_elementwise(&refs)?)
}

/// Writes the final LoRA and the best face image of `id`.
pub fn fuse(
    store: &UserStore,
    id: &UserId,
    checkpoints: &[(u32, PathBuf)],
    scores: &[Scored],
    crops: &[RgbImage],
    top_merge: usize,
) -> Result<Fused> {
    let Some((last_step, _)) = checkpoints.last() else {
        return Err(PipelineError::InvalidInput {
            path: store.weights_dir(id),
            reason: "no checkpoint to fuse".into(),
        });
    };
    let top = top_scored(scores, top_merge);
    let (steps, best_image, best_score) = match top.first() {
        Some(best) => (top.iter().map(|s| s.step).collect(), Some(best.path.clone()), best.score),
        None => {
            let latest = scores.iter().filter(|s| s.step == *last_step).map(|s| s.path.clone()).next();
            (vec![*last_step], latest, None)
        }
    };
    let lora_path = store.lora_path(id);
    if let Some(dir) = lora_path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| PipelineError::Io { path: dir.to_path_buf(), source })?;
    }
    average_checkpoints(checkpoints, &steps)?.save(&lora_path, DType::F16)?;
    let target = store.best_face_image(id);
    match best_image {
        Some(path) => {
            let bytes = std::fs::read(&path).map_err(|source| PipelineError::Read { path, source })?;
            write_atomic(&target, &bytes)?;
        }
        None => {
            let crop = crops.first().ok_or_else(|| PipelineError::InvalidInput {
                path: store.processed_dir(id),
                reason: "no training image".into(),
            })?;
            let mut jpeg = Vec::new();
            JpegEncoder::new_with_quality(&mut jpeg, 75)
                .encode_image(crop)
                .map_err(|e| PipelineError::Io { path: target.clone(), source: std::io::Error::other(e) })?;
            write_atomic(&target, &jpeg)?;
        }
    }
    Ok(Fused { steps, best_score })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_are_listed_by_step_and_other_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "checkpoint-200.safetensors",
            "checkpoint-100.safetensors",
            "checkpoint-x.safetensors",
            "checkpoint-300.safetensors.tmp",
            "train_state.safetensors",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let steps: Vec<u32> = checkpoints(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![100, 200]);
        assert!(matches!(checkpoints(&dir.path().join("missing")), Err(PipelineError::Read { .. })));
    }

    #[test]
    fn the_best_scores_come_first_and_unscored_images_are_left_out() {
        let s = |step: u32, score: Option<f32>| Scored { step, template: 0, path: PathBuf::new(), score };
        let scores = [s(100, Some(0.5)), s(200, None), s(300, Some(0.7)), s(400, Some(0.5)), s(500, Some(0.1))];
        let top: Vec<u32> = top_scored(&scores, 3).iter().map(|x| x.step).collect();
        assert_eq!(top, vec![300, 100, 400], "equal scores keep their order");
        assert_eq!(top_scored(&scores, 10).len(), 4);
        assert!(top_scored(&[s(1, None)], 10).is_empty());
    }
}
