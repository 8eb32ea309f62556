//! ControlNet sampling through the diffusion crate's residual hook against diffusers'
//! `StableDiffusionControlNetPipeline` (two units with their own weights and guidance windows),
//! `StableDiffusionControlNetInpaintPipeline` (ordinary UNet, guess mode) and
//! `StableDiffusionXLControlNetPipeline` (guess mode, guidance window), on the tiny
//! components (`tools/reference/controlnet_pipelines.py`). Step latents within 1e-5 of their
//! magnitude, the decoded image within 1e-3.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, diffusion_fixtures, fixtures, io};
use easyphoto_controlnet::{ControlMode, ControlUnit, Controls, load_controlnet};
use easyphoto_diffusion::sampling::{
    Flow, Inpaint, MicroConditioning, Progress, SamplingOptions, Start, TextConditioning, decode_latents,
    denoise_with_residuals, normalize_image, prepare_mask,
};
use easyphoto_diffusion::schedulers::SchedulerConfig;
use easyphoto_diffusion::{AutoencoderKL, UNet2DConditionModel, diffusers_folder};

/// diffusers' `DDIMScheduler` as both pipelines ran it (SD 1.5's betas, `leading` spacing).
const DDIM: &str = r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
    "clip_sample": false, "set_alpha_to_one": false}"#;

/// The tiny components of a case: SD 1.5-like, or SDXL-like.
#[derive(Clone, Copy)]
struct Components {
    unet: &'static str,
    vae: &'static str,
    controlnet: &'static str,
    guidance_scale: f64,
}

const SD15: Components = Components { unet: "sd15", vae: "vae", controlnet: "sd15_controlnet", guidance_scale: 7.5 };
const SDXL: Components = Components { unet: "sdxl", vae: "vae3", controlnet: "sdxl_controlnet", guidance_scale: 5.0 };

fn unet(c: Components) -> UNet2DConditionModel {
    diffusers_folder::load_unet(&diffusion_fixtures().join(c.unet), None, DType::F32, &Device::Cpu).unwrap()
}

fn vae(c: Components) -> AutoencoderKL {
    diffusers_folder::load_vae(&diffusion_fixtures().join(c.vae), None, DType::F32, &Device::Cpu).unwrap()
}

fn controlnet(c: Components) -> Arc<easyphoto_controlnet::ControlNetModel> {
    Arc::new(load_controlnet(&fixtures().join(c.controlnet), None, DType::F32, &Device::Cpu).unwrap())
}

/// The case's prompt embeddings; SDXL also pooled embeddings and micro-conditioning.
fn text(t: &HashMap<String, Tensor>) -> TextConditioning {
    let sdxl = t.contains_key("pooled_prompt_embeds");
    let micro = MicroConditioning { original_size: (80, 48), crops_coords_top_left: (4, 2), target_size: (64, 32) };
    TextConditioning {
        prompt_embeds: t["prompt_embeds"].clone(),
        negative_prompt_embeds: t["negative_prompt_embeds"].clone(),
        pooled: sdxl.then(|| (t["pooled_prompt_embeds"].clone(), t["negative_pooled_prompt_embeds"].clone())),
        micro: sdxl.then_some((micro, micro)),
    }
}

/// Runs the loop with `controls`, checking every step's latents, then the final image (1e-3).
fn run_and_check(
    c: Components,
    t: &HashMap<String, Tensor>,
    start: Start,
    inpaint: Option<&Inpaint>,
    mut noise_draws: VecDeque<Tensor>,
    mut controls: Controls,
) {
    let (unet, vae) = (unet(c), vae(c));
    let mut scheduler = SchedulerConfig::from_json(DDIM).unwrap().build().unwrap();
    let mut noise = |like: &Tensor| -> candle_core::Result<Tensor> {
        let next = noise_draws.pop_front().expect("the loop drew more noise than diffusers");
        assert_eq!(next.dims(), like.dims());
        Ok(next)
    };
    let steps = &t["step_latents"];
    let mut seen = 0;
    let mut check = |p: &Progress| {
        let expected = steps.get(p.step - 1).unwrap().unsqueeze(0).unwrap();
        // Latents reach |x| ≈ 50 here: compare relative to the magnitude (f32 carries ~7 digits),
        // as the diffusion crate's pipeline tests do.
        let scale = common::max_abs(&expected).max(1.0);
        assert_close(&format!("step {} latents", p.step), p.latents, &expected, 1e-5 * scale);
        seen = p.step;
        Flow::Continue
    };
    let options = SamplingOptions { num_inference_steps: 8, guidance_scale: c.guidance_scale };
    let latents = denoise_with_residuals(
        &unet,
        scheduler.as_mut(),
        &text(t),
        start,
        inpaint,
        &options,
        &mut noise,
        &mut check,
        Some(&mut controls),
    )
    .unwrap();
    assert_eq!(seen, steps.dim(0).unwrap());
    let image = decode_latents(&vae, &latents).unwrap();
    let err = assert_close("image_out", &image, &t["image_out"], 1e-3);
    println!("image max abs error {err:e}");
}

#[test]
fn txt2img_with_two_units_and_guidance_windows_matches_diffusers() {
    let t = io("pipelines/txt2img_two_units.safetensors");
    let model = controlnet(SD15);
    let units = vec![
        ControlUnit { weight: 0.7, ..ControlUnit::new(model.clone(), t["control_image_0"].clone()) },
        ControlUnit {
            weight: 0.4,
            guidance_start: 0.25,
            guidance_end: 0.75,
            ..ControlUnit::new(model, t["control_image_1"].clone())
        },
    ];
    run_and_check(SD15, &t, Start::Noise(t["latents"].clone()), None, VecDeque::new(), Controls::new(units));
}

#[test]
fn inpaint_in_guess_mode_matches_diffusers() {
    let t = io("pipelines/inpaint_guess_mode.safetensors");
    let vae = vae(SD15);
    let encode = |image: &Tensor, noise: &Tensor| {
        let sample = vae.encode(&normalize_image(image).unwrap()).unwrap().sample_with(noise).unwrap();
        (sample * vae.scaling_factor()).unwrap()
    };
    let image_latents = encode(&t["image"], &t["posterior_image"]);
    let (_, latent_mask) = prepare_mask(&t["mask"], 2).unwrap();
    let inpaint = Inpaint::Blend { mask: latent_mask, image_latents: image_latents.clone() };
    let unit = ControlUnit {
        weight: 0.8,
        mode: ControlMode::GuessMode,
        ..ControlUnit::new(controlnet(SD15), t["control_image"].clone())
    };
    let start = Start::Image { latents: image_latents, strength: 0.75 };
    let draws = VecDeque::from([t["add_noise"].clone()]);
    run_and_check(SD15, &t, start, Some(&inpaint), draws, Controls::new(vec![unit]));
}

#[test]
fn sdxl_in_guess_mode_with_a_guidance_window_matches_diffusers() {
    // The ControlNet sees the conditional rows of the latents, text, text_embeds and time_ids.
    let t = io("pipelines/sdxl_guess_mode.safetensors");
    let unit = ControlUnit {
        weight: 0.9,
        mode: ControlMode::GuessMode,
        guidance_end: 0.75,
        ..ControlUnit::new(controlnet(SDXL), t["control_image"].clone())
    };
    let start = Start::Noise(t["latents"].clone());
    run_and_check(SDXL, &t, start, None, VecDeque::new(), Controls::new(vec![unit]));
}

#[test]
fn control_changes_the_result() {
    // Guard against a hook that is never called: without the units the txt2img case differs.
    let t = io("pipelines/txt2img_two_units.safetensors");
    let unet = unet(SD15);
    let mut scheduler = SchedulerConfig::from_json(DDIM).unwrap().build().unwrap();
    let mut noise = |_: &Tensor| -> candle_core::Result<Tensor> { panic!("DDIM draws no noise") };
    let options = SamplingOptions { num_inference_steps: 8, guidance_scale: 7.5 };
    let latents = denoise_with_residuals(
        &unet,
        scheduler.as_mut(),
        &text(&t),
        Start::Noise(t["latents"].clone()),
        None,
        &options,
        &mut noise,
        &mut |_| Flow::Continue,
        None,
    )
    .unwrap();
    let diff = common::max_abs_diff(&latents, &t["latents_out"]);
    assert!(diff > 1e-2, "the ControlNets changed the latents by only {diff}");
}
