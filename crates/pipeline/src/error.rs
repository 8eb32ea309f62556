//! The crate's error type.

use std::path::PathBuf;

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
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, PipelineError>;
