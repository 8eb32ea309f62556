//! A Stable Diffusion model assembled from a checkpoint as users download it (single file or
//! diffusers pipeline folder), with txt2img on top: the thin composition of UNet, VAE, text
//! encoders and a scheduler that diffusers' `StableDiffusionPipeline` / A1111's txt2img are.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::clip::CLIPTextConfig;
use crate::diffusers_folder::{self, read_config};
use crate::error::{DiffusionError, Result};
use crate::noise::SeededNoise;
use crate::prompt::ExtraNetwork;
use crate::sampling::{Flow, MicroConditioning, Progress, SamplingOptions, Start, decode_latents, denoise};
use crate::schedulers::Sampler;
use crate::single_file::{ModelFamily, SingleFile, TextEncoderSlot};
use crate::text_encoding::{Encoder, Layer, PromptEncoder, TextEncoders};
use crate::tokenizer::{ClipTokenizer, PadToken};
use crate::unet_2d_condition::UNet2DConditionModel;
use crate::vae::AutoencoderKL;

/// UNet, VAE, text encoders and the scheduler settings of one checkpoint.
#[derive(Debug, Clone)]
pub struct StableDiffusion {
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoders: TextEncoders,
    pub family: ModelFamily,
    /// The checkpoint's `scheduler_config.json` (any class): samplers take their betas from it.
    pub scheduler_config: Value,
}

/// A txt2img request, with A1111's / EasyPhoto's defaults.
#[derive(Debug, Clone)]
pub struct Txt2Img {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub sampler: Sampler,
    pub seed: u64,
}

impl Default for Txt2Img {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            steps: 20,
            guidance_scale: 7.0,
            sampler: Sampler::DpmPp2MSdeKarras,
            seed: 0,
        }
    }
}

/// The scheduler settings every SD1.x / SD2.x / SDXL checkpoint was trained with.
fn default_scheduler_config() -> Value {
    serde_json::json!({
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "prediction_type": "epsilon",
    })
}

impl StableDiffusion {
    /// Loads a single-file checkpoint or a diffusers pipeline folder. `clip_skip` (1 = off) is
    /// A1111's setting for SD1.x models.
    pub fn load(path: &Path, clip_skip: usize, dtype: DType, device: &Device) -> Result<Self> {
        if path.is_dir() {
            Self::from_diffusers_folder(path, clip_skip, dtype, device)
        } else {
            Self::from_single_file(path, clip_skip, dtype, device)
        }
    }

    /// Loads everything from one `.safetensors` / `.ckpt`, with the embedded CLIP vocabulary.
    pub fn from_single_file(path: &Path, clip_skip: usize, dtype: DType, device: &Device) -> Result<Self> {
        let file = SingleFile::open(path)?;
        let family = file.family()?;
        let unet = file.load_unet(&file.unet_config()?, dtype, device)?;
        let vae = file.load_vae(&file.vae_config()?, dtype, device)?;
        let config = |slot| file.text_encoder_config(slot);
        let encoders = match family {
            ModelFamily::Sd1 | ModelFamily::Sd2 => {
                let slot = TextEncoderSlot::TextEncoder;
                let model = file.load_text_encoder(slot, &config(slot)?, dtype, device)?;
                let pad = if family == ModelFamily::Sd1 { PadToken::EndOfText } else { PadToken::Exclamation };
                let skip = if family == ModelFamily::Sd1 { clip_skip } else { 1 };
                vec![PromptEncoder {
                    tokenizer: ClipTokenizer::embedded(pad)?,
                    encoder: Encoder::Plain(model),
                    layer: Layer::Normed { skip },
                }]
            }
            ModelFamily::Sdxl => {
                let (s1, s2) = (TextEncoderSlot::TextEncoder, TextEncoderSlot::TextEncoder2);
                let l = file.load_text_encoder(s1, &config(s1)?, dtype, device)?;
                let g = file.load_text_encoder_with_projection(s2, &config(s2)?, dtype, device)?;
                vec![
                    PromptEncoder {
                        tokenizer: ClipTokenizer::embedded(PadToken::EndOfText)?,
                        encoder: Encoder::Plain(l),
                        layer: Layer::Penultimate,
                    },
                    PromptEncoder {
                        tokenizer: ClipTokenizer::embedded(PadToken::Exclamation)?,
                        encoder: Encoder::Projected(g),
                        layer: Layer::Penultimate,
                    },
                ]
            }
            ModelFamily::SdxlRefiner => {
                return Err(DiffusionError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    message: "the SDXL refiner is not supported for txt2img".into(),
                });
            }
        };
        Ok(Self {
            unet,
            vae,
            text_encoders: TextEncoders::new(encoders)?,
            family,
            scheduler_config: default_scheduler_config(),
        })
    }

    /// Loads a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
    /// `text_encoder_2/` and `tokenizer_2/` for SDXL, `scheduler/`).
    pub fn from_diffusers_folder(dir: &Path, clip_skip: usize, dtype: DType, device: &Device) -> Result<Self> {
        let unet = diffusers_folder::load_unet(&dir.join("unet"), None, dtype, device)?;
        let vae = diffusers_folder::load_vae(&dir.join("vae"), None, dtype, device)?;
        let sdxl = dir.join("text_encoder_2").is_dir();
        let te1: CLIPTextConfig = read_config(&dir.join("text_encoder/config.json"))?;
        let sd2 = !sdxl && te1.hidden_act == "gelu";
        let family = if sdxl {
            ModelFamily::Sdxl
        } else if sd2 {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        };
        let tokenizer = |name: &str| ClipTokenizer::from_folder(dir.join(name));
        let l = diffusers_folder::load_clip_text_model(&dir.join("text_encoder"), None, dtype, device)?;
        let encoders = if sdxl {
            let g = diffusers_folder::load_clip_text_model_with_projection(
                &dir.join("text_encoder_2"),
                None,
                dtype,
                device,
            )?;
            vec![
                PromptEncoder {
                    tokenizer: tokenizer("tokenizer")?,
                    encoder: Encoder::Plain(l),
                    layer: Layer::Penultimate,
                },
                PromptEncoder {
                    tokenizer: tokenizer("tokenizer_2")?,
                    encoder: Encoder::Projected(g),
                    layer: Layer::Penultimate,
                },
            ]
        } else {
            let skip = if sd2 { 1 } else { clip_skip };
            vec![PromptEncoder {
                tokenizer: tokenizer("tokenizer")?,
                encoder: Encoder::Plain(l),
                layer: Layer::Normed { skip },
            }]
        };
        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        let scheduler_config =
            if scheduler_path.exists() { read_config(&scheduler_path)? } else { default_scheduler_config() };
        Ok(Self { unet, vae, text_encoders: TextEncoders::new(encoders)?, family, scheduler_config })
    }

    /// Generates one image `[1, 3, H, W]` in [0, 1]; also returns the `<lora:…>` tags the prompt
    /// named (apply them with `easyphoto-lora` before calling). The callback sees every step and
    /// may cancel.
    pub fn txt2img(
        &self,
        request: &Txt2Img,
        progress: &mut dyn FnMut(&Progress) -> Flow,
    ) -> Result<(Tensor, Vec<ExtraNetwork>)> {
        let factor = self.vae.config().downscale_factor() * (1 << (self.unet.config().block_out_channels.len() - 1));
        let fits = |v: usize| v > 0 && v.is_multiple_of(factor);
        if !fits(request.width) || !fits(request.height) {
            return Err(DiffusionError::input(
                "width",
                format!("width and height must be positive multiples of {factor}"),
            ));
        }
        let (mut text, networks) = self.text_encoders.conditioning(&request.prompt, &request.negative_prompt)?;
        if self.unet.config().uses_text_time() {
            let size = (request.height, request.width);
            let micro = MicroConditioning { original_size: size, crops_coords_top_left: (0, 0), target_size: size };
            text.micro = Some((micro, micro));
        }
        let mut scheduler = request.sampler.config(&self.scheduler_config)?.build()?;
        let vae_factor = self.vae.config().downscale_factor();
        let shape = (1, self.unet.config().out_channels, request.height / vae_factor, request.width / vae_factor);
        let mut noise = SeededNoise::new(request.seed);
        let initial = noise.randn(shape, text.prompt_embeds.dtype(), self.unet.device())?;
        let options = SamplingOptions { num_inference_steps: request.steps, guidance_scale: request.guidance_scale };
        let latents = denoise(
            &self.unet,
            scheduler.as_mut(),
            &text,
            Start::Noise(initial),
            None,
            &options,
            &mut noise,
            progress,
        )?;
        Ok((decode_latents(&self.vae, &latents)?, networks))
    }
}
