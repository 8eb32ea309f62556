//! ControlNet for easyphoto-rs.
//!
//! - [`conditioning_embedding`]: the hint encoder that turns a conditioning image into
//!   UNet-resolution features (diffusers `ControlNetConditioningEmbedding`).
//! - [`controlnet`]: the ControlNet model (diffusers `ControlNetModel`) and its config.
//! - [`load`]: loading from original `.pth` / `.safetensors` files and diffusers folders.
//! - [`control`]: control units (weight, guidance window, control mode) applied while sampling.
//! - [`original_keys`]: key names of the original lllyasviel checkpoints mapped to diffusers names.
//! - [`preprocess`]: the conditioning preprocessors (canny, colour map, tile, openpose).
//! - [`error`]: the crate's error type.

pub mod conditioning_embedding;
pub mod control;
pub mod controlnet;
pub mod error;
pub mod load;
pub mod original_keys;
pub mod preprocess;
mod weights;

pub use conditioning_embedding::{
    ControlNetConditioningEmbedding, ControlNetConditioningEmbeddingConfig, DIFFUSERS_PREFIX,
};
pub use control::{ControlMode, ControlUnit, Controls};
pub use controlnet::{ControlNetConfig, ControlNetModel};
pub use error::ControlNetError;
pub use load::load_controlnet;
pub use original_keys::original_hint_key_to_diffusers;
