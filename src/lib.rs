//! EasyPhoto in Rust: one crate that re-exports the workspace's libraries. Depend on the
//! individual crates to pull in less.
//!
//! - [`diffusion`]: Stable Diffusion UNet, VAE and checkpoint loading.
//! - [`controlnet`]: ControlNet models and conditioning preprocessors.
//! - [`lora`]: LoRA files, merging and training.
//! - [`face`]: face detection, landmarks, embeddings and masks through ONNX Runtime.
//! - [`pipeline`]: the EasyPhoto train and infer flows.

pub use easyphoto_controlnet as controlnet;
pub use easyphoto_diffusion as diffusion;
pub use easyphoto_face as face;
pub use easyphoto_lora as lora;
pub use easyphoto_pipeline as pipeline;
