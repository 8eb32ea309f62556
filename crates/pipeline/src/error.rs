//! The crate's error type.

use std::path::PathBuf;

use crate::models::MissingModel;

/// Everything that can go wrong in `easyphoto-pipeline`.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("invalid user id {id:?}: {reason}")]
    InvalidUserId { id: String, reason: String },

    #[error("user id {id:?} already exists ({path})")]
    UserExists { id: String, path: PathBuf },

    #[error("user {id:?} is not trained yet: {missing} is missing")]
    UserNotReady { id: String, missing: PathBuf },

    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },

    #[error("{path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{file}: unknown field `{field}` (known fields: {known})")]
    UnknownConfigField { file: String, field: String, known: String },

    #[error("{file}: {message}")]
    InvalidConfig { file: String, message: String },

    #[error("invalid value for `{field}`: {reason}")]
    InvalidParameter { field: String, reason: String },

    #[error("the embedded model manifest is invalid: {0}")]
    Manifest(String),

    #[error("no model named {name:?} in the manifest (see `easyphoto models list`)")]
    UnknownModel { name: String },

    #[error("{}", missing_models_message(models_dir, missing))]
    ModelsMissing { models_dir: PathBuf, missing: Vec<MissingModel> },

    #[error("model file(s) failed verification: {}", files.join("; "))]
    ModelsCorrupt { files: Vec<String> },

    #[error("{file}: {url} does not exist (HTTP 404)")]
    NotFound { file: String, url: String },

    #[error("{file}: {url} answered HTTP {status}{}", if *status == 401 || *status == 403 { " (a gated or private file: set HF_TOKEN)" } else { "" })]
    HttpStatus { file: String, url: String, status: u16 },

    #[error("{file}: download from {url} failed after {attempts} attempts: {message}")]
    Network { file: String, url: String, attempts: u32, message: String },

    #[error("{file}: sha256 {actual} does not match the expected {expected}; the download was deleted")]
    ChecksumMismatch { file: String, expected: String, actual: String },

    #[error("{file}: {actual} bytes where {expected} were expected")]
    SizeMismatch { file: String, expected: u64, actual: u64 },

    #[error("cancelled during {stage}")]
    Cancelled { stage: String },

    #[error("{path}: only {found} photos, at least {minimum} are needed (EasyPhoto asks for 5 to 20)")]
    TooFewPhotos { path: PathBuf, found: usize, minimum: usize },

    #[error("{path}: not a readable image: {reason}")]
    NotAnImage { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    InvalidInput { path: PathBuf, reason: String },

    #[error(transparent)]
    Face(#[from] easyphoto_face::FaceError),

    #[error(transparent)]
    Diffusion(Box<easyphoto_diffusion::DiffusionError>),

    #[error(transparent)]
    Lora(Box<easyphoto_lora::LoraError>),

    #[error("tensor operation failed during {stage}: {source}")]
    Tensor { stage: String, source: Box<candle_core::Error> },

    #[error("{path}: a face was found in {found} of the photos, at least {minimum} are needed; no face in: {}", skipped.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    TooFewFaces { path: PathBuf, found: usize, minimum: usize, skipped: Vec<PathBuf> },

    #[error(transparent)]
    ControlNet(Box<easyphoto_controlnet::ControlNetError>),

    #[error(transparent)]
    Preprocess(Box<easyphoto_controlnet::preprocess::PreprocessError>),

    #[error("{template}: no face in the template (upload a template with a face)")]
    NoTemplateFace { template: String },

    #[error("not yet implemented in this build: {stage}")]
    NotImplemented { stage: String },
}

fn missing_models_message(models_dir: &std::path::Path, missing: &[MissingModel]) -> String {
    let mut text = format!(
        "{} model file(s) missing from {}. Run `easyphoto models fetch` (it resumes partial downloads), or put each file at its path:",
        missing.len(),
        models_dir.display()
    );
    for m in missing {
        text.push_str(&format!("\n  - {} ({}): {}\n      from {}", m.name, m.role, m.path.display(), m.url));
    }
    text
}

impl From<easyphoto_diffusion::DiffusionError> for PipelineError {
    fn from(e: easyphoto_diffusion::DiffusionError) -> Self {
        Self::Diffusion(Box::new(e))
    }
}

impl From<easyphoto_lora::LoraError> for PipelineError {
    fn from(e: easyphoto_lora::LoraError) -> Self {
        Self::Lora(Box::new(e))
    }
}

impl From<easyphoto_controlnet::ControlNetError> for PipelineError {
    fn from(e: easyphoto_controlnet::ControlNetError) -> Self {
        Self::ControlNet(Box::new(e))
    }
}

impl From<easyphoto_controlnet::preprocess::PreprocessError> for PipelineError {
    fn from(e: easyphoto_controlnet::preprocess::PreprocessError) -> Self {
        Self::Preprocess(Box::new(e))
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, PipelineError>;
