//! The checked inputs of the two flows: everything that can be refused before any work starts
//! (user ids, photos, templates, parameters, trained users, model files) is refused here, with a
//! typed error naming the file or field, and nothing is written.
//!
//! The flows take a [`TrainJob`] / [`InferJob`]; the CLI and any server build them the same way.

use std::path::{Path, PathBuf};

use crate::config::{InferConfig, MIN_TRAIN_PHOTOS, TrainConfig};
use crate::error::{PipelineError, Result};
use crate::models::{Flow, Manifest};
use crate::user::{UserId, UserStore};

/// Where a job finds users, models and downloads.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub store: UserStore,
    pub models_dir: PathBuf,
    /// Named in the missing-model error, as where to download from.
    pub endpoint: String,
}

/// A training request whose inputs passed every check.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub user_id: UserId,
    /// The photos, sorted by file name, each with a readable image header.
    pub photos: Vec<PathBuf>,
    pub config: TrainConfig,
    /// The step rule applied to the photos (an upper bound until face detection drops some).
    pub train_steps: u32,
}

impl TrainJob {
    /// Checks, in order: the parameters, the photo folder (at least [`MIN_TRAIN_PHOTOS`] readable
    /// images), that the id is new, and that every model file of the train flow is present.
    pub fn check(
        ws: &Workspace,
        manifest: &Manifest,
        user_id: UserId,
        photos_dir: &Path,
        config: TrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        let photos = images_in(photos_dir)?;
        if photos.len() < MIN_TRAIN_PHOTOS {
            return Err(PipelineError::TooFewPhotos {
                path: photos_dir.to_path_buf(),
                found: photos.len(),
                minimum: MIN_TRAIN_PHOTOS,
            });
        }
        ws.store.check_new(&user_id)?;
        crate::train::require_train_models(manifest, &ws.models_dir, &config, &ws.endpoint)?;
        let train_steps = config.train_steps(photos.len());
        Ok(Self { user_id, photos, config, train_steps })
    }
}

/// An inference request whose inputs passed every check.
#[derive(Debug, Clone)]
pub struct InferJob {
    /// One slot per template face from left to right; `None` (the id `none`) skips that face.
    pub user_ids: Vec<Option<UserId>>,
    /// Template images, folders expanded and sorted.
    pub templates: Vec<PathBuf>,
    pub output_dir: PathBuf,
    pub config: InferConfig,
}

impl InferJob {
    /// Parses user slots as EasyPhoto's user dropdowns do: `none` skips a face, any other value
    /// must be a valid id, and at least one slot must name a user.
    pub fn parse_user_ids(ids: &[String]) -> Result<Vec<Option<UserId>>> {
        let slots = ids
            .iter()
            .map(|id| if id.trim().eq_ignore_ascii_case("none") { Ok(None) } else { UserId::new(id).map(Some) })
            .collect::<Result<Vec<_>>>()?;
        if slots.iter().all(Option::is_none) {
            return Err(PipelineError::InvalidParameter {
                field: "user-id".into(),
                reason: "every user id is `none`".into(),
            });
        }
        Ok(slots)
    }

    /// Checks, in order: the parameters, the templates (readable images; a folder must hold at
    /// least one), the output folder, that every user is trained, and the infer flow's models.
    pub fn check(
        ws: &Workspace,
        manifest: &Manifest,
        user_ids: Vec<Option<UserId>>,
        templates: &[PathBuf],
        output_dir: &Path,
        config: InferConfig,
    ) -> Result<Self> {
        config.validate()?;
        let mut found = Vec::new();
        for path in templates {
            if path.is_dir() {
                let images = images_in(path)?;
                if images.is_empty() {
                    return Err(PipelineError::InvalidInput {
                        path: path.clone(),
                        reason: "no .jpg, .jpeg or .png template in this folder".into(),
                    });
                }
                found.extend(images);
            } else {
                check_image(path)?;
                found.push(path.clone());
            }
        }
        if found.is_empty() {
            return Err(PipelineError::InvalidParameter {
                field: "template".into(),
                reason: "no template given".into(),
            });
        }
        if output_dir.exists() && !output_dir.is_dir() {
            return Err(PipelineError::InvalidInput {
                path: output_dir.to_path_buf(),
                reason: "the output exists and is not a folder".into(),
            });
        }
        for id in user_ids.iter().flatten() {
            ws.store.check_ready(id)?;
        }
        manifest.require(&ws.models_dir, Some(Flow::Infer), &ws.endpoint)?;
        Ok(Self { user_ids, templates: found, output_dir: output_dir.to_path_buf(), config })
    }
}

/// The images of a folder (`.jpg`, `.jpeg`, `.png`, sorted), each checked to be readable.
pub fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(PipelineError::InvalidInput { path: dir.to_path_buf(), reason: "not a folder".into() });
    }
    let read = |source| PipelineError::Read { path: dir.to_path_buf(), source };
    let mut images = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        if path.is_file() && matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) {
            images.push(path);
        }
    }
    images.sort();
    images.iter().try_for_each(|p| check_image(p))?;
    Ok(images)
}

/// Reads the header of an image: a typed error naming the file when it is not one.
pub fn check_image(path: &Path) -> Result<()> {
    let not_image = |reason: String| PipelineError::NotAnImage { path: path.to_path_buf(), reason };
    let (w, h) = image::ImageReader::open(path)
        .map_err(|e| not_image(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| not_image(e.to_string()))?
        .into_dimensions()
        .map_err(|e| not_image(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(not_image(format!("{w}×{h} pixels")));
    }
    Ok(())
}
