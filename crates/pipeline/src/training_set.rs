//! The processed training set of a user, as EasyPhoto's preprocessing writes it:
//! `processed_images/train/<i>.jpg` (the face crops on white), `<i>.txt` (the caption) and
//! `processed_images/metadata.jsonl` (`{"file_name": "train/<i>.jpg", "text": caption}` per line).
//!
//! EasyPhoto trains on the crops read back from these JPEGs (Pillow's quality 75), so
//! [`load_training_set`] is what the trainer should read, and what a resumed training reads.

use std::path::PathBuf;

use image::RgbImage;
use image::codecs::jpeg::JpegEncoder;
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};
use crate::user::{UserId, UserStore, write_atomic};

/// JPEG quality of the crops (Pillow's default, which EasyPhoto's `save` uses).
const QUALITY: u8 = 75;

/// One line of `metadata.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataLine {
    /// Relative to `processed_images/`.
    pub file_name: String,
    pub text: String,
}

/// Writes the crops, their captions and `metadata.jsonl`; returns the image paths.
pub fn save_training_set(store: &UserStore, id: &UserId, crops: &[RgbImage], caption: &str) -> Result<Vec<PathBuf>> {
    let mut jsonl = String::new();
    let mut saved = Vec::with_capacity(crops.len());
    for (i, crop) in crops.iter().enumerate() {
        let path = store.processed_image(id, i);
        let mut jpeg = Vec::new();
        JpegEncoder::new_with_quality(&mut jpeg, QUALITY)
            .encode_image(crop)
            .map_err(|e| PipelineError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
        write_atomic(&path, &jpeg)?;
        write_atomic(&store.caption(id, i), caption.as_bytes())?;
        let line = MetadataLine { file_name: format!("train/{i}.jpg"), text: caption.to_string() };
        let json = serde_json::to_string(&line)
            .map_err(|source| PipelineError::Json { path: store.metadata_jsonl(id), source })?;
        jsonl.push_str(&json);
        jsonl.push('\n');
        saved.push(path);
    }
    write_atomic(&store.metadata_jsonl(id), jsonl.as_bytes())?;
    Ok(saved)
}

/// Reads the training set back through `metadata.jsonl`: each image (decoded as RGB) with its
/// caption. A bad line names the file and line; a listed image that is missing or corrupt, the image.
pub fn load_training_set(store: &UserStore, id: &UserId) -> Result<Vec<(RgbImage, String)>> {
    let path = store.metadata_jsonl(id);
    let text = std::fs::read_to_string(&path).map_err(|source| PipelineError::Read { path: path.clone(), source })?;
    let dir = store.processed_dir(id);
    let mut set = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |reason: String| PipelineError::InvalidInput {
            path: path.clone(),
            reason: format!("line {}: {reason}", n + 1),
        };
        let entry: MetadataLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let relative = std::path::Path::new(&entry.file_name);
        if !relative.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
            return Err(bad(format!("{:?} leaves processed_images/", entry.file_name)));
        }
        let image = easyphoto_face::load_rgb(dir.join(relative))?;
        set.push((image, entry.text));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VALIDATION_PROMPT;

    #[test]
    fn the_training_set_round_trips_through_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::new(dir.path());
        let id = UserId::new("王小明").unwrap();
        let crops: Vec<RgbImage> = (0..3)
            .map(|k| RgbImage::from_fn(32, 40, |x, y| image::Rgb([x as u8 * 7, y as u8 * 6, 60 * k as u8])))
            .collect();
        let saved = save_training_set(&store, &id, &crops, VALIDATION_PROMPT).unwrap();
        assert_eq!(saved[2], store.processed_image(&id, 2));
        assert_eq!(std::fs::read_to_string(store.caption(&id, 1)).unwrap(), VALIDATION_PROMPT);
        let jsonl = std::fs::read_to_string(store.metadata_jsonl(&id)).unwrap();
        assert_eq!(
            jsonl.lines().next().unwrap(),
            r#"{"file_name":"train/0.jpg","text":"easyphoto_face, easyphoto, 1person"}"#
        );
        let set = load_training_set(&store, &id).unwrap();
        assert_eq!(set.len(), 3);
        for ((image, caption), crop) in set.iter().zip(&crops) {
            assert_eq!(caption, VALIDATION_PROMPT);
            assert_eq!(image.dimensions(), (32, 40));
            // JPEG q75 on smooth ramps: a few levels of error.
            let max = image.as_raw().iter().zip(crop.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(max <= 12, "{max}");
        }
    }

    #[test]
    fn bad_metadata_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::new(dir.path());
        let id = UserId::new("x").unwrap();
        save_training_set(&store, &id, &[RgbImage::new(8, 8)], "c").unwrap();
        let path = store.metadata_jsonl(&id);
        for (text, needle) in [
            ("{\"file_name\": \"train/0.jpg\", \"text\": \"c\"}\n{\"file_name\": 3}\n", "line 2"),
            ("{\"file_name\": \"../../../etc/passwd\", \"text\": \"c\"}\n", "leaves processed_images"),
            ("{\"file_name\": \"train/9.jpg\", \"text\": \"c\"}\n", "9.jpg"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = load_training_set(&store, &id).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
            if needle.starts_with("line") || needle.starts_with("leaves") {
                assert!(err.contains("metadata.jsonl"), "{err}");
            }
        }
    }
}
