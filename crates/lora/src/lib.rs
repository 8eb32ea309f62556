//! LoRA for easyphoto-rs: read and write the kohya/A1111 and diffusers/peft formats, apply
//! several LoRAs to a UNet and its text encoders (merged or attached at run time), fuse
//! checkpoints as EasyPhoto does, and train a LoRA with EasyPhoto's recipe.
//!
//! - [`kohya_file`]: kohya `.safetensors` LoRAs (down/up/alpha per module, metadata); the
//!   crate's in-memory form of any LoRA.
//! - [`peft_file`]: diffusers/peft LoRAs (`lora_A`/`lora_B`, alphas in metadata or config).
//! - [`naming`]: kohya module names (`lora_unet_...`) to and from real module paths.
//! - [`sgm_names`]: the original (SGM) UNet names kohya's SDXL files use, as aliases.
//! - [`family`]: which base family (SD1/SD2/SDXL) a LoRA and a model are.
//! - [`mod@merge`]: the merge math `W + m · alpha/rank · up·down`.
//! - [`adapter`]: the run-time LoRA branch attached through the diffusion crate's `Adapter`.
//! - [`apply`]: several LoRAs at once, merged or attached, with a report of unmatched keys.
//! - [`fuse`]: averaging checkpoints: EasyPhoto's element-wise mean, and the delta mean by SVD.
//! - [`network`]: the trainable LoRA (kohya's targets and init), attached to the frozen models.
//! - [`adamw`]: torch's AdamW and gradient-norm clipping, with saveable state.
//! - [`train_config`]: EasyPhoto's training recipe as an overridable config.
//! - [`trainer`]: the training loop (SD1/SD2 and SDXL): checkpoints, resume, callbacks.
//! - [`error`]: the crate's error type.

pub mod adamw;
pub mod adapter;
pub mod apply;
pub mod error;
pub mod family;
pub mod fuse;
pub mod kohya_file;
pub mod merge;
pub mod naming;
pub mod network;
pub mod peft_file;
pub mod sgm_names;
pub mod train_config;
pub mod trainer;

pub use adapter::LoraAdapter;
pub use apply::{LoraReport, Merged, Slot, Targets, attach, detach, merge};
pub use error::LoraError;
pub use family::{BaseFamily, lora_family};
pub use fuse::{average_deltas, average_elementwise};
pub use kohya_file::{KohyaLora, KohyaModule};
pub use merge::{delta_weight, lora_scale, merge_weight, scaled_product};
pub use naming::{KohyaPrefix, ModuleIndex, kohya_name};
pub use network::LoraNetwork;
pub use peft_file::{PeftAlpha, load_peft, save_peft};
pub use train_config::TrainConfig;
pub use trainer::{
    Callbacks, Progress, SdxlTrainModels, TrainImage, TrainModels, Trained, diffusion_loss, sdxl_text_conditioning,
    train, train_sdxl,
};

/// Reads a LoRA file in either format: diffusers/peft when some key has `lora_A`/`lora_B`, kohya
/// otherwise.
pub fn load_lora(path: impl AsRef<std::path::Path>, device: &candle_core::Device) -> Result<KohyaLora, LoraError> {
    let path = path.as_ref();
    let bytes = kohya_file::read(path)?;
    let file = path.display().to_string();
    let (st, _) = kohya_file::deserialize(&bytes, &file)?;
    if peft_file::is_peft(st.names()) {
        peft_file::peft_from_bytes(&bytes, &file, None, device)
    } else {
        KohyaLora::from_bytes(&bytes, &file, device)
    }
}
