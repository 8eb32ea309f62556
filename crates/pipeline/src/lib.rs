//! The EasyPhoto train and infer flows, composed from the `easyphoto-*` crates, and what runs
//! around them.
//!
//! - [`user`]: user ids (any Unicode name, validated before it names files), the per-user
//!   on-disk layout, and atomic writes.
//! - [`original_backup`]: the first training step, the uploaded photos saved EXIF-transposed as RGB JPEGs.
//! - [`training_set`]: the processed crops, captions and `metadata.jsonl`, written and read back.
//! - [`train`]: the train flow, photos to the user's final LoRA and best face (its steps in
//!   `train/`: preprocess, validation, face_id_score, fuse).
//! - [`models`]: the manifest of every model file the flows need, resolved under a models
//!   directory, with `verify`, the offline check and the lock of downloaded digests.
//! - [`download`]: resumable, checked downloads of manifest files (Hugging Face URL scheme).
//! - [`jobs`]: the checked inputs of the train and infer flows (ids, photos, templates, users, models).
//! - [`config`]: the flows' parameters with EasyPhoto's names and defaults, from files and overrides.
//! - [`progress`]: progress observers and cancellation, shared by downloads and flows.
//! - [`components`]: the infer flow's models (SD1.5 base, ControlNets, face models, style LoRA).
//! - [`infer`]: the infer flow, one template to a batch, multi-person templates.
//! - [`latent_mask`]: the WebUI's latent inpainting mask (Pillow bicubic reduction, rounded).
//! - [`creative`]: the template-free SDXL txt2img with the user's SDXL LoRA.
//! - [`cli`] (feature `cli`): the `easyphoto` command line.
//! - [`error`]: the crate's error type.

#[cfg(feature = "cli")]
pub mod cli;
pub mod components;
pub mod config;
pub mod creative;
pub mod download;
pub mod error;
pub mod infer;
pub mod jobs;
pub mod latent_mask;
pub mod models;
pub mod original_backup;
pub mod progress;
pub mod train;
pub mod training_set;
pub mod user;

pub use components::{ComponentPaths, Components};
pub use config::{InferConfig, TrainConfig, load_config};
pub use download::{Downloader, Fetched};
pub use error::{PipelineError, Result};
pub use infer::{InferReport, run_job};
pub use jobs::{InferJob, TrainJob, Workspace};
pub use models::{Flow, Lock, Manifest, MissingModel, ModelFile, Verification};
pub use progress::{CancelToken, Observer, Progress, Silent};
pub use train::{BaseModel, Photos, TrainComponents, TrainOutcome, resume_user, train_user};
pub use user::{UserId, UserInfo, UserStore, write_atomic};
