//! Stable Diffusion (SD1.x, SD2.x, SDXL) in candle: the UNet and VAE of diffusers, loaded from
//! diffusers folders or from the single-file checkpoints users download, with every linear and
//! convolution addressable by its diffusers path for LoRA.
//!
//! ```no_run
//! use easyphoto_diffusion::{load_unet, load_vae};
//! # fn main() -> easyphoto_diffusion::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let unet = load_unet("v1-5-pruned-emaonly.safetensors".as_ref(), candle_core::DType::F32, &device)?;
//! let vae = load_vae("v1-5-pruned-emaonly.safetensors".as_ref(), candle_core::DType::F32, &device)?;
//! # Ok(()) }
//! ```

pub mod attention;
pub mod clip;
pub mod cpu;
pub mod diffusers_folder;
pub mod embeddings;
pub mod error;
pub mod inpaint_overlay;
pub mod layers;
pub mod noise;
pub mod prompt;
pub mod resnet;
pub mod sampling;
pub mod schedulers;
pub mod single_file;
pub mod stable_diffusion;
pub mod text_encoding;
pub mod tokenizer;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;
pub mod weights;

mod load;

pub use clip::{CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection};
pub use error::{DiffusionError, Result, ShapeMismatch};
pub use layers::{Adapter, LayerMut, LowRank, VisitLayers};
pub use load::{load_unet, load_vae};
pub use noise::SeededNoise;
pub use prompt::{ExtraNetwork, PromptChunk, PromptPart};
pub use single_file::{ModelFamily, SingleFile, TextEncoderSlot};
pub use stable_diffusion::{StableDiffusion, Txt2Img};
pub use tokenizer::{ClipTokenizer, PadToken};
pub use unet_2d_condition::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning};
pub use vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, Tiling};
