//! The crate's error type.

use std::path::PathBuf;

/// A weight whose stored shape differs from the one the model expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The key as stored in the checkpoint.
    pub key: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

impl std::fmt::Display for ShapeMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (expected {:?}, found {:?})", self.key, self.expected, self.found)
    }
}

/// Everything that can go wrong in `easyphoto-diffusion`.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path} is not a readable checkpoint (truncated or corrupt?): {source}")]
    Checkpoint { path: PathBuf, source: candle_core::Error },

    #[error("{path}: invalid config field `{field}`: {message}")]
    Config { path: PathBuf, field: String, message: String },

    #[error("{path}: unknown architecture: {message}")]
    UnknownArchitecture { path: PathBuf, message: String },

    #[error("{path}: {} missing key(s): {}", keys.len(), keys.join(", "))]
    MissingKeys { path: PathBuf, keys: Vec<String> },

    #[error("{path}: {} weight(s) with the wrong shape: {}", mismatches.len(),
        mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    ShapeMismatch { path: PathBuf, mismatches: Vec<ShapeMismatch> },

    #[error("no layer named `{0}` in this model")]
    UnknownLayer(String),

    #[error("invalid input `{name}`: {message}")]
    InvalidInput { name: &'static str, message: String },

    #[error("cancelled by the progress callback after step {step}")]
    Cancelled { step: usize },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, DiffusionError>;

impl DiffusionError {
    pub(crate) fn config(path: impl Into<PathBuf>, field: &str, message: impl Into<String>) -> Self {
        Self::Config { path: path.into(), field: field.to_string(), message: message.into() }
    }

    pub(crate) fn input(name: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidInput { name, message: message.into() }
    }
}
