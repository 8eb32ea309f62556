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
//!
//! Two ControlNets in the WebUI's "My prompt is more important" mode, sampled through the
//! diffusion crate's residual hook:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use candle_core::{DType, Device, Tensor};
//! use easyphoto_controlnet::{ControlMode, ControlUnit, Controls, load_controlnet};
//! # fn main() -> Result<(), easyphoto_controlnet::ControlNetError> {
//! let device = Device::Cpu;
//! let canny = Arc::new(load_controlnet("control_v11p_sd15_canny.pth".as_ref(), None, DType::F32, &device)?);
//! let color = Arc::new(load_controlnet("control_sd15_random_color.pth".as_ref(), None, DType::F32, &device)?);
//! # let (edges, colours) = (Tensor::zeros((1, 3, 512, 512), DType::F32, &device)?, Tensor::zeros((1, 3, 512, 512), DType::F32, &device)?);
//! let soft = |model, image, weight| ControlUnit {
//!     weight,
//!     mode: ControlMode::PromptMoreImportant,
//!     ..ControlUnit::new(model, image)
//! };
//! let mut controls = Controls::new(vec![soft(canny, edges, 0.5), soft(color, colours, 0.85)]);
//! // then: easyphoto_diffusion::sampling::denoise_with_residuals(.., Some(&mut controls))
//! # Ok(()) }
//! ```

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
