//! ControlNet for easyphoto-rs.
//!
//! - [`conditioning_embedding`]: the hint encoder that turns a conditioning image into
//!   UNet-resolution features (diffusers `ControlNetConditioningEmbedding`).
//! - [`original_keys`]: key names of the original lllyasviel checkpoints mapped to diffusers names.
//! - [`preprocess`]: the conditioning preprocessors (canny, colour map, tile, openpose).
//! - [`error`]: the crate's error type.

pub mod conditioning_embedding;
pub mod error;
pub mod original_keys;
pub mod preprocess;
mod weights;

pub use conditioning_embedding::{
    ControlNetConditioningEmbedding, ControlNetConditioningEmbeddingConfig, DIFFUSERS_PREFIX,
};
pub use error::ControlNetError;
pub use original_keys::original_hint_key_to_diffusers;
