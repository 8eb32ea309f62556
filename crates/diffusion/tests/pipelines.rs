//! The sampling loops against diffusers' StableDiffusion / Img2Img / Inpaint / XL pipelines built
//! from the tiny fixture components, with every random draw fixed
//! (`tools/reference/pipelines.py`).

mod common;

use std::collections::{HashMap, VecDeque};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, io};
use easyphoto_diffusion::sampling::{
    Flow, Inpaint, MicroConditioning, SamplingOptions, Start, TextConditioning, decode_latents, denoise, masked_image,
    normalize_image, prepare_mask,
};
use easyphoto_diffusion::schedulers::SchedulerConfig;
use easyphoto_diffusion::{AutoencoderKL, DiffusionError, SingleFile, UNet2DConditionModel, diffusers_folder};

struct Case {
    json: serde_json::Value,
    t: HashMap<String, Tensor>,
}

impl Case {
    fn load(name: &str) -> Self {
        let path = fixtures().join(format!("pipelines/{name}.json"));
        let json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        Self { json, t: io(&format!("pipelines/{name}.safetensors")) }
    }

    fn unet(&self) -> UNet2DConditionModel {
        let name = self.json["unet"].as_str().unwrap();
        if self.json["unet_weights"].as_str().unwrap().ends_with(".ckpt") {
            let file = SingleFile::open(fixtures().join(self.json["unet_weights"].as_str().unwrap())).unwrap();
            return file.load_unet(&file.unet_config().unwrap(), DType::F32, &Device::Cpu).unwrap();
        }
        diffusers_folder::load_unet(&fixtures().join(name), None, DType::F32, &Device::Cpu).unwrap()
    }

    fn vae(&self) -> AutoencoderKL {
        diffusers_folder::load_vae(&fixtures().join(self.json["vae"].as_str().unwrap()), None, DType::F32, &Device::Cpu)
            .unwrap()
    }

    /// The named draw whose purpose mentions `what` (a VAE posterior sample).
    fn posterior_noise(&self, what: &str) -> Tensor {
        let draw = self.json["noise_draws"].as_array().unwrap().iter().find(|d| {
            let purpose = d["purpose"].as_str().unwrap();
            purpose.starts_with("posterior") && purpose.contains(what)
        });
        self.t[draw.unwrap()["name"].as_str().unwrap()].clone()
    }

    /// The draws the loop itself makes (everything but posterior samples), in order.
    fn loop_noise(&self) -> VecDeque<Tensor> {
        let draws = self.json["noise_draws"].as_array().unwrap();
        draws
            .iter()
            .filter(|d| !d["purpose"].as_str().unwrap().starts_with("posterior"))
            .map(|d| self.t[d["name"].as_str().unwrap()].clone())
            .collect()
    }

    fn text(&self) -> TextConditioning {
        let pair = |a: &str, b: &str| Some((self.t.get(a)?.clone(), self.t.get(b)?.clone()));
        let size = |k: &str| {
            let v = self.json.get(k)?.as_array()?;
            Some((v[0].as_u64()? as usize, v[1].as_u64()? as usize))
        };
        let micro = size("original_size").map(|original_size| {
            let m = MicroConditioning {
                original_size,
                crops_coords_top_left: size("crops_coords_top_left").unwrap(),
                target_size: size("target_size").unwrap(),
            };
            (m, m)
        });
        TextConditioning {
            prompt_embeds: self.t["prompt_embeds"].clone(),
            negative_prompt_embeds: self.t["negative_prompt_embeds"].clone(),
            pooled: pair("pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
            micro,
        }
    }

    /// The case's scheduler, read the way diffusers writes `scheduler_config.json` (the fixture
    /// spells -inf as a string; Python's json module writes the non-JSON `-Infinity`).
    fn scheduler(&self) -> Box<dyn easyphoto_diffusion::schedulers::Scheduler> {
        let text = self.json["scheduler"].to_string().replace("\"-inf\"", "-Infinity");
        SchedulerConfig::from_json(&text).unwrap().build().unwrap()
    }

    fn options(&self) -> SamplingOptions {
        SamplingOptions {
            num_inference_steps: self.json["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: self.json["guidance_scale"].as_f64().unwrap(),
        }
    }

    fn encode(&self, vae: &AutoencoderKL, image: &Tensor, noise: &Tensor) -> Tensor {
        let sample = vae.encode(image).unwrap().sample_with(noise).unwrap();
        (sample * vae.scaling_factor()).unwrap()
    }

    /// Runs our loop the way the case's diffusers pipeline ran, and checks every step.
    fn run(&self) {
        let (unet, vae) = (self.unet(), self.vae());
        let mut scheduler = self.scheduler();
        let strength = self.json["strength"].as_f64().unwrap_or(1.0);
        let factor = self.json["vae_scale_factor"].as_u64().unwrap() as usize;
        let inpaint_mask = self.t.get("mask").map(|m| prepare_mask(m, factor).unwrap());
        let image_latents = self.t.get("image").filter(|_| !self.t.contains_key("latents")).map(|image| {
            let noise = self.posterior_noise("init image");
            self.encode(&vae, &normalize_image(image).unwrap(), &noise)
        });
        let inpaint = inpaint_mask.as_ref().map(|(binary, latent_mask)| {
            if self.json["unet_in_channels"].as_u64() == Some(9) {
                let masked = masked_image(&self.t["image"], binary).unwrap();
                let noise = self.posterior_noise("masked image");
                Inpaint::Conditioned {
                    mask: latent_mask.clone(),
                    masked_image_latents: self.encode(&vae, &masked, &noise),
                }
            } else {
                Inpaint::Blend { mask: latent_mask.clone(), image_latents: image_latents.clone().unwrap() }
            }
        });
        let start = match (self.t.get("latents"), &image_latents) {
            (Some(latents), _) => Start::Noise(latents.clone()),
            (None, Some(latents)) => Start::Image { latents: latents.clone(), strength },
            (None, None) => panic!("case has neither latents nor an image"),
        };
        let mut draws = self.loop_noise();
        let mut noise = |like: &Tensor| -> candle_core::Result<Tensor> {
            let next = draws.pop_front().expect("the loop drew more noise than diffusers");
            assert_eq!(next.dims(), like.dims());
            Ok(next)
        };
        let steps = &self.t["step_latents"];
        let mut seen = 0;
        let mut check_step = |p: &easyphoto_diffusion::sampling::Progress| {
            let expected = steps.get(p.step - 1).unwrap().unsqueeze(0).unwrap();
            // Euler-family latents reach |x| ≈ 50: compare relative to the magnitude (f32 carries ~7 digits).
            let scale = common::max_abs(&expected).max(1.0);
            assert_close(&format!("step {} latents", p.step), p.latents, &expected, 1e-5 * scale);
            seen = p.step;
            Flow::Continue
        };
        let latents = denoise(
            &unet,
            scheduler.as_mut(),
            &self.text(),
            start,
            inpaint.as_ref(),
            &self.options(),
            &mut noise,
            &mut check_step,
        )
        .unwrap();
        assert_eq!(seen, steps.dim(0).unwrap(), "number of steps");
        assert!(draws.is_empty(), "diffusers drew {} more noise tensors", draws.len());
        let scale = common::max_abs(&self.t["latents_out"]).max(1.0);
        assert_close("latents_out", &latents, &self.t["latents_out"], 1e-5 * scale);
        let image = decode_latents(&vae, &latents).unwrap();
        assert_close("image_out", &image, &self.t["image_out"], 1e-3);
    }
}

#[test]
fn txt2img_ddim() {
    Case::load("txt2img_sd15_ddim").run();
}

#[test]
fn txt2img_dpmpp_2m_sde_karras() {
    Case::load("txt2img_sd15_dpmpp_2m_sde_karras").run();
}

#[test]
fn txt2img_euler_ancestral() {
    Case::load("txt2img_sd15_euler_a").run();
}

#[test]
fn img2img_euler() {
    Case::load("img2img_sd15_euler").run();
}

#[test]
fn inpaint_with_9_channel_unet() {
    Case::load("inpaint_sd15_9ch").run();
}

#[test]
fn inpaint_with_ordinary_unet_blends_known_region() {
    Case::load("inpaint_sd15_4ch").run();
}

#[test]
fn sdxl_txt2img_euler() {
    Case::load("txt2img_sdxl_euler").run();
}

#[test]
fn callback_can_cancel() {
    let case = Case::load("txt2img_sd15_ddim");
    let unet = case.unet();
    let mut scheduler = case.scheduler();
    let mut noise = |like: &Tensor| like.zeros_like();
    let mut cancel_at_3 =
        |p: &easyphoto_diffusion::sampling::Progress| if p.step == 3 { Flow::Cancel } else { Flow::Continue };
    let start = Start::Noise(case.t["latents"].clone());
    let err =
        denoise(&unet, scheduler.as_mut(), &case.text(), start, None, &case.options(), &mut noise, &mut cancel_at_3)
            .unwrap_err();
    assert!(matches!(err, DiffusionError::Cancelled { step: 3 }), "{err:?}");
}
