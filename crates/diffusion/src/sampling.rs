//! The denoising loops of diffusers' Stable Diffusion pipelines (txt2img, img2img, inpainting
//! with 9-channel or ordinary UNets, SDXL), over any [`Scheduler`], with classifier-free guidance,
//! seeded device-independent noise, and a progress callback that can cancel.

use candle_core::{DType, Device, Tensor};

use crate::error::{DiffusionError, Result};
use crate::schedulers::{NoiseSource, Scheduler, img2img_start_index};
use crate::unet_2d_condition::{UNet2DConditionModel, UNetConditioning};
use crate::vae::AutoencoderKL;

/// Text conditioning of one generation: the prompt's and the negative prompt's encoder states
/// (`[B, L, D]`), and for SDXL the pooled embeddings and micro-conditioning.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    pub prompt_embeds: Tensor,
    pub negative_prompt_embeds: Tensor,
    /// SDXL: pooled, projected embeddings of the prompt and of the negative prompt (`[B, D]`).
    pub pooled: Option<(Tensor, Tensor)>,
    /// SDXL: the micro-conditioning of the prompt and of the negative prompt.
    pub micro: Option<(MicroConditioning, MicroConditioning)>,
}

/// SDXL's size conditioning (diffusers `original_size`, `crops_coords_top_left`, `target_size`),
/// each as (height, width) / (top, left).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConditioning {
    pub original_size: (usize, usize),
    pub crops_coords_top_left: (usize, usize),
    pub target_size: (usize, usize),
}

impl MicroConditioning {
    /// The six `time_ids` diffusers builds from these values.
    pub fn time_ids(&self, batch: usize, device: &Device) -> Result<Tensor> {
        let (o, c, t) = (self.original_size, self.crops_coords_top_left, self.target_size);
        let ids = [o.0, o.1, c.0, c.1, t.0, t.1].map(|v| v as f32);
        Ok(Tensor::new(&ids, device)?.unsqueeze(0)?.repeat((batch, 1))?)
    }
}

/// What the loop starts from.
#[derive(Debug, Clone)]
pub enum Start {
    /// Pure noise (txt2img): unit-Gaussian latents, scaled by the scheduler's initial sigma.
    Noise(Tensor),
    /// img2img: the clean latents of the init image (already `* scaling_factor`), noised to
    /// the level that `strength` selects.
    Image { latents: Tensor, strength: f64 },
}

/// Inpainting inputs, at latent resolution.
#[derive(Debug, Clone)]
pub enum Inpaint {
    /// 9-channel inpainting UNets: the mask (1 = repaint, `[B, 1, h, w]`) and the latents of the
    /// masked image are concatenated to the UNet input.
    Conditioned { mask: Tensor, masked_image_latents: Tensor },
    /// Ordinary UNets: after every step the known region is replaced by the clean image latents
    /// noised to the next timestep.
    Blend { mask: Tensor, image_latents: Tensor },
}

/// Settings of one sampling run.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; guidance is off at 1 or below (one UNet batch per step).
    pub guidance_scale: f64,
}

/// What the progress callback sees after each step.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Steps done so far (1-based) and the total.
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    pub latents: &'a Tensor,
}

/// Whether a run goes on after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Cancel,
}

/// What a [`ResidualProvider`] sees before each UNet call.
#[derive(Debug)]
pub struct StepInput<'a> {
    /// 0-based index of the step among the steps this run executes, and their number.
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    /// The UNet's latent input after `scale_model_input`, before any inpainting channels are
    /// concatenated: `[B, 4, h, w]`, or `[2B, 4, h, w]` under guidance.
    pub sample: &'a Tensor,
    /// The encoder states batched like `sample`.
    pub context: &'a Tensor,
    /// SDXL's `text_embeds` / `time_ids`, batched like `sample`.
    pub conditioning: &'a UNetConditioning<'a>,
    /// Whether the batch is classifier-free guided: then its first `batch` rows are the negative
    /// (unconditional) branch and the last `batch` rows the positive (conditional) one.
    pub guided: bool,
    pub batch: usize,
}

/// Residuals added to the UNet's skip connections and mid block at one step (what ControlNets
/// produce), batched like [`StepInput::sample`].
#[derive(Debug, Clone)]
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// Supplies per-step UNet residuals to the sampling loop; the loop knows nothing of where they
/// come from.
pub trait ResidualProvider {
    /// The residuals for this step, or `None` to run the UNet without any.
    fn residuals(&mut self, input: &StepInput) -> Result<Option<Residuals>>;
}

/// Runs the denoising loop and returns the final latents (still scaled by the VAE's factor).
/// `noise` supplies every random draw after the initial latents, in diffusers' order (the
/// img2img / inpainting `add_noise` draw first, then the scheduler's per-step draws).
/// Inpainting with an ordinary UNet starting from pure noise reuses that noise to re-noise the
/// known region, as diffusers does.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    unet: &UNet2DConditionModel,
    scheduler: &mut dyn Scheduler,
    text: &TextConditioning,
    start: Start,
    inpaint: Option<&Inpaint>,
    options: &SamplingOptions,
    noise: &mut dyn NoiseSource,
    progress: &mut dyn FnMut(&Progress) -> Flow,
) -> Result<Tensor> {
    denoise_with_residuals(unet, scheduler, text, start, inpaint, options, noise, progress, None)
}

/// [`denoise`] with a [`ResidualProvider`] consulted before every UNet call (ControlNets).
#[allow(clippy::too_many_arguments)]
pub fn denoise_with_residuals(
    unet: &UNet2DConditionModel,
    scheduler: &mut dyn Scheduler,
    text: &TextConditioning,
    start: Start,
    inpaint: Option<&Inpaint>,
    options: &SamplingOptions,
    noise: &mut dyn NoiseSource,
    progress: &mut dyn FnMut(&Progress) -> Flow,
    mut residuals: Option<&mut dyn ResidualProvider>,
) -> Result<Tensor> {
    scheduler.set_timesteps(options.num_inference_steps)?;
    // The draw that made the starting latents is also the noise that re-noises the known region
    // when inpainting with an ordinary UNet (as in diffusers).
    let (mut latents, timesteps, start_noise) = match start {
        Start::Noise(initial) => ((&initial * scheduler.init_noise_sigma())?, scheduler.timesteps().to_vec(), initial),
        Start::Image { latents, strength } => {
            let begin = img2img_start_index(options.num_inference_steps, strength, scheduler.order());
            let timesteps = scheduler.timesteps()[begin.min(scheduler.timesteps().len())..].to_vec();
            let Some(&first) = timesteps.first() else {
                return Err(DiffusionError::input("strength", format!("{strength} leaves no denoising steps")));
            };
            scheduler.set_begin_index(begin);
            let draw = noise.noise_like(&latents)?;
            (scheduler.add_noise(&latents, &draw, first)?, timesteps, draw)
        }
    };
    let guided = options.guidance_scale > 1.0;
    let batch = latents.dim(0)?;
    let context = if guided {
        Tensor::cat(&[&text.negative_prompt_embeds, &text.prompt_embeds], 0)?
    } else {
        text.prompt_embeds.clone()
    };
    let pair = |(pos, neg): (&Tensor, &Tensor)| -> Result<Tensor> {
        Ok(if guided { Tensor::cat(&[neg, pos], 0)? } else { pos.clone() })
    };
    let text_embeds = text.pooled.as_ref().map(|(p, n)| pair((p, n))).transpose()?;
    let time_ids = match &text.micro {
        Some((p, n)) => {
            let device = latents.device();
            Some(pair((&p.time_ids(batch, device)?, &n.time_ids(batch, device)?))?)
        }
        None => None,
    };
    let cond =
        UNetConditioning { text_embeds: text_embeds.as_ref(), time_ids: time_ids.as_ref(), ..Default::default() };

    let total = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let mut input = scheduler.scale_model_input(&input, t)?;
        let extra = match residuals.as_deref_mut() {
            Some(provider) => provider.residuals(&StepInput {
                step: i,
                total,
                timestep: t,
                sample: &input,
                context: &context,
                conditioning: &cond,
                guided,
                batch,
            })?,
            None => None,
        };
        if let Some(Inpaint::Conditioned { mask, masked_image_latents }) = inpaint {
            let extra = if guided {
                (Tensor::cat(&[mask, mask], 0)?, Tensor::cat(&[masked_image_latents, masked_image_latents], 0)?)
            } else {
                (mask.clone(), masked_image_latents.clone())
            };
            input = Tensor::cat(&[&input, &extra.0.to_dtype(input.dtype())?, &extra.1.to_dtype(input.dtype())?], 1)?;
        }
        let timestep = Tensor::new(&[t as f32], latents.device())?;
        let step_cond = UNetConditioning {
            down_block_additional_residuals: extra.as_ref().map(|r| r.down.as_slice()),
            mid_block_additional_residual: extra.as_ref().map(|r| &r.mid),
            ..cond
        };
        let pred = unet.forward(&input, &timestep, &context, &step_cond)?;
        let pred = if guided {
            let (uncond, cond) = (pred.narrow(0, 0, batch)?, pred.narrow(0, batch, batch)?);
            (&uncond + ((cond - &uncond)? * options.guidance_scale)?)?
        } else {
            pred
        };
        latents = scheduler.step(&pred, t, &latents, noise)?;
        if let Some(Inpaint::Blend { mask, image_latents }) = inpaint {
            let known = match timesteps.get(i + 1) {
                Some(&next) => scheduler.add_noise(image_latents, &start_noise, next)?,
                None => image_latents.clone(),
            };
            let mask = mask.to_dtype(latents.dtype())?;
            latents = (known.broadcast_mul(&(1.0 - &mask)?)? + latents.broadcast_mul(&mask)?)?;
        }
        if progress(&Progress { step: i + 1, total, timestep: t, latents: &latents }) == Flow::Cancel {
            return Err(DiffusionError::Cancelled { step: i + 1 });
        }
    }
    Ok(latents)
}

/// diffusers' inpainting mask preparation: `mask` `[B, 1, H, W]` (1 = repaint) binarised at 0.5,
/// and its nearest-neighbour reduction to the latent grid (`1/factor` of the image size).
/// Returns (binary mask, latent mask).
pub fn prepare_mask(mask: &Tensor, factor: usize) -> Result<(Tensor, Tensor)> {
    let (_, _, h, w) = mask.dims4()?;
    if factor == 0 || !h.is_multiple_of(factor) || !w.is_multiple_of(factor) {
        return Err(DiffusionError::input("mask", format!("size {h}×{w} is not a multiple of {factor}")));
    }
    let binary = mask.ge(0.5)?.to_dtype(mask.dtype())?;
    let latent = binary.upsample_nearest2d(h / factor, w / factor)?;
    Ok((binary, latent))
}

/// The image the 9-channel inpainting UNet sees: `image` (in [0, 1]) normalised to [-1, 1], with
/// the region to repaint set to 0.
pub fn masked_image(image: &Tensor, binary_mask: &Tensor) -> Result<Tensor> {
    let keep = binary_mask.lt(0.5)?.to_dtype(image.dtype())?;
    Ok(normalize_image(image)?.broadcast_mul(&keep)?)
}

/// Images `[B, 3, H, W]` in [0, 1] to the VAE's input range [-1, 1].
pub fn normalize_image(image: &Tensor) -> Result<Tensor> {
    Ok(((image * 2.0)? - 1.0)?)
}

/// Decodes final latents to images in [0, 1] (diffusers' `vae.decode(latents / scaling_factor)`
/// and `postprocess`).
pub fn decode_latents(vae: &AutoencoderKL, latents: &Tensor) -> Result<Tensor> {
    let image = vae.decode(&(latents.to_dtype(DType::F32)? / vae.scaling_factor())?)?;
    Ok(((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}
