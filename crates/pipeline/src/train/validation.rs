//! Validation during training (anatomy §1.5): at every checkpoint, each template's face box ×1.3
//! is inpainted by a fresh copy of the base model with the checkpoint merged at multiplier 1
//! (diffusers' inpainting with an ordinary 4-channel UNet: latent blending), prompt
//! `easyphoto_face, easyphoto, 1person` against EasyPhoto's validation negative prompt,
//! strength 0.65, 20 steps of DPM++ 2M, CFG 9, one noise stream seeded with the training seed
//! per round.
//!
//! Templates are resized so their short side is the training resolution, both sides floored to
//! multiples of 64, each at its own size (EasyPhoto reuses the last template's size for all of
//! them, a bug we do not reproduce).

use std::path::Path;

use candle_core::{DType, Tensor};
use easyphoto_diffusion::SeededNoise;
use easyphoto_diffusion::sampling::{
    Flow, Inpaint, SamplingOptions, Start, decode_latents, denoise, normalize_image, prepare_mask,
};
use easyphoto_diffusion::schedulers::Sampler;
use easyphoto_face::FaceDetector;
use easyphoto_face::masks::box_mask;
use easyphoto_lora::KohyaLora;
use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};

use super::BaseModel;
use super::preprocess::left_most;
use crate::config::TrainConfig;
use crate::error::{PipelineError, Result};
use crate::progress::{CancelToken, Observer, Progress};
use crate::user::{UserId, UserStore, write_atomic};

/// Progress stage of this step (one step per template and checkpoint).
pub const STAGE: &str = "validation";

/// The sampler of the validation images (diffusers' `DPMSolverMultistepScheduler` defaults).
pub const SAMPLER: Sampler = Sampler::DpmPp2M;

/// A validation template at its sampling size, with the region to inpaint.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub image: RgbImage,
    /// 255 inside the face box ×`validation_mask_ratio`.
    pub mask: GrayImage,
}

/// Resizes each template and finds its face box (the left-most face); a template without a face
/// is an error naming it.
pub fn prepare_templates(
    templates: &[(String, RgbImage)],
    config: &TrainConfig,
    detector: &dyn FaceDetector,
) -> Result<Vec<Template>> {
    templates
        .iter()
        .map(|(name, image)| {
            let (w, h) = (f64::from(image.width()), f64::from(image.height()));
            let scale = f64::from(config.resolution) / w.min(h);
            let floor64 = |v: f64| (((v * scale) as u32) / 64 * 64).max(64);
            let (nw, nh) = (floor64(w), floor64(h));
            let image = image::imageops::resize(image, nw, nh, FilterType::CatmullRom);
            let faces = detector.detect_some(&image, &format!("validation template {name}"))?;
            let (face, _) = left_most(&faces, 1.0, nw, nh).ok_or_else(|| PipelineError::InvalidParameter {
                field: "templates".into(),
                reason: format!("no face in {name}"),
            })?;
            let bx =
                easyphoto_face::geometry::expand_box(face.bbox.map(f64::from), config.validation_mask_ratio, nw, nh);
            Ok(Template { name: name.clone(), mask: box_mask(nw, nh, bx), image })
        })
        .collect()
}

/// Inpaints every template with the LoRA of `checkpoint` and writes
/// `validation/step-<step>_template-<k>.jpg`.
#[allow(clippy::too_many_arguments)]
pub fn validate_checkpoint(
    store: &UserStore,
    id: &UserId,
    base: &BaseModel,
    checkpoint: &Path,
    step: u32,
    templates: &[Template],
    config: &TrainConfig,
    seed: u64,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<()> {
    if templates.is_empty() {
        return Ok(());
    }
    let device = base.unet.device().clone();
    let lora = KohyaLora::load(checkpoint, &device)?;
    let sd = base.with_lora(Some(&lora))?;
    let (text, _) = sd.text_encoders.conditioning(&config.validation_prompt, &config.neg_prompt)?;
    let options = SamplingOptions {
        num_inference_steps: config.validation_inference_steps as usize,
        guidance_scale: config.guidance_scale,
    };
    let message = format!("checkpoint {step}");
    // One generator for the whole round, drawn from template after template (as EasyPhoto's).
    let mut noise = SeededNoise::new(seed);
    for (k, template) in templates.iter().enumerate() {
        cancel.check(STAGE)?;
        let tensor_err = |source| PipelineError::Tensor { stage: STAGE.into(), source: Box::new(source) };
        let dtype = text.prompt_embeds.dtype();
        let image = image_tensor(&template.image, &device).and_then(|t| t.to_dtype(dtype)).map_err(tensor_err)?;
        let mask = mask_tensor(&template.mask, &device).and_then(|t| t.to_dtype(dtype)).map_err(tensor_err)?;
        let (_, latent_mask) = prepare_mask(&mask, sd.vae.config().downscale_factor())?;
        let posterior = sd.vae.encode(&normalize_image(&image)?)?;
        let draw = noise.randn(posterior.mean.dims(), posterior.mean.dtype(), &device).map_err(tensor_err)?;
        let latents =
            (posterior.sample_with(&draw).map_err(tensor_err)? * sd.vae.scaling_factor()).map_err(tensor_err)?;
        let mut scheduler = SAMPLER.config(&sd.scheduler_config)?.build()?;
        let inpaint = Inpaint::Blend { mask: latent_mask, image_latents: latents.clone() };
        let start = Start::Image { latents, strength: config.validation_strength };
        let mut on_step = |_: &easyphoto_diffusion::sampling::Progress| {
            if cancel.is_cancelled() { Flow::Cancel } else { Flow::Continue }
        };
        let result =
            denoise(&sd.unet, scheduler.as_mut(), &text, start, Some(&inpaint), &options, &mut noise, &mut on_step);
        let latents = match result {
            Err(easyphoto_diffusion::DiffusionError::Cancelled { .. }) => {
                return Err(PipelineError::Cancelled { stage: STAGE.into() });
            }
            other => other?,
        };
        let decoded = decode_latents(&sd.vae, &latents)?;
        let rgb = to_rgb(&decoded).map_err(tensor_err)?;
        let path = store.validation_image(id, step, k);
        let mut jpeg = Vec::new();
        JpegEncoder::new_with_quality(&mut jpeg, 75)
            .encode_image(&rgb)
            .map_err(|e| PipelineError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
        write_atomic(&path, &jpeg)?;
        observer.progress(Progress {
            stage: STAGE,
            step: k as u64 + 1,
            total: Some(templates.len() as u64),
            message: &message,
        });
    }
    Ok(())
}

/// `[1, 3, H, W]` in [0, 1].
fn image_tensor(image: &RgbImage, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let (w, h) = image.dimensions();
    let v: Vec<f32> = image.as_raw().iter().map(|&c| f32::from(c) / 255.0).collect();
    Tensor::from_vec(v, (h as usize, w as usize, 3), device)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()
}

/// `[1, 1, H, W]`, 1 where the mask is set.
fn mask_tensor(mask: &GrayImage, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let (w, h) = mask.dimensions();
    let v: Vec<f32> = mask.as_raw().iter().map(|&m| if m > 127 { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(v, (1, 1, h as usize, w as usize), device)
}

/// `[1, 3, H, W]` in [0, 1] to 8-bit RGB, rounded as diffusers' `numpy_to_pil`.
pub(crate) fn to_rgb(image: &Tensor) -> candle_core::Result<RgbImage> {
    let (_, _, h, w) = image.dims4()?;
    let v: Vec<u8> = (image.squeeze(0)?.permute((1, 2, 0))?.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|x| x.clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, v).ok_or_else(|| candle_core::Error::Msg("decoded image size".into()))
}
