//! The error type of the crate.

/// Everything that can go wrong building or loading a ControlNet.
#[derive(Debug, thiserror::Error)]
pub enum ControlNetError {
    /// A weight the module needs is not in the checkpoint.
    #[error("missing weight `{key}`")]
    MissingWeight {
        /// Full key of the weight, e.g. `controlnet_cond_embedding.conv_in.weight`.
        key: String,
    },
    /// A weight is in the checkpoint with another shape than the config implies.
    #[error("weight `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Full key of the weight.
        key: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape stored in the checkpoint.
        found: Vec<usize>,
    },
    /// A config field holds a value the module cannot be built from.
    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// Name of the field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An `input_hint_block` key of an original checkpoint that maps to no diffusers weight.
    #[error("original ControlNet key `{key}`: {reason}")]
    UnexpectedOriginalKey {
        /// The key as stored in the checkpoint.
        key: String,
        /// Why it maps to nothing.
        reason: String,
    },
    /// An input tensor has the wrong shape or is missing.
    #[error("invalid input `{field}`: {reason}")]
    InvalidInput {
        /// Name of the input.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading a checkpoint or config failed (unreadable file, missing keys, wrong shapes).
    #[error(transparent)]
    Diffusion(#[from] easyphoto_diffusion::DiffusionError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
