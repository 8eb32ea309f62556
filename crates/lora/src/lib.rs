//! LoRA for easyphoto-rs, in the kohya-ss sd-scripts format.
//!
//! - [`kohya_file`]: parse a kohya `.safetensors` LoRA into per-module (down, up, alpha).
//! - [`naming`]: kohya module names (`lora_unet_...`) to and from real module paths.
//! - [`merge`]: fold a LoRA pair into the weight it adapts (kohya `merge_to`, peft `merge`).
//! - [`error`]: the crate's error type.

pub mod error;
pub mod kohya_file;
pub mod merge;
pub mod naming;

pub use error::LoraError;
pub use kohya_file::{KohyaLora, KohyaModule};
pub use merge::{delta_weight, lora_scale, merge_weight};
pub use naming::{KohyaPrefix, ModuleIndex, kohya_name};
