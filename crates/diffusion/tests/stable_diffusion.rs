//! txt2img through `StableDiffusion` on the tiny fixture model: deterministic per seed, shaped
//! and ranged as an image, the same as composing the parts by hand; and single-file loading of a
//! whole SD1 checkpoint (UNet, VAE, text encoder).

mod common;

use candle_core::{DType, Device};
use common::{fixtures, ldm_tensors, max_abs_diff, write_checkpoint};
use easyphoto_diffusion::sampling::{Flow, SamplingOptions, Start, decode_latents, denoise};
use easyphoto_diffusion::schedulers::Sampler;
use easyphoto_diffusion::text_encoding::{Encoder, Layer, PromptEncoder, TextEncoders};
use easyphoto_diffusion::{
    ClipTokenizer, DiffusionError, ModelFamily, SeededNoise, StableDiffusion, Txt2Img, diffusers_folder,
};

fn tiny() -> StableDiffusion {
    let dev = Device::Cpu;
    let clip = diffusers_folder::load_clip_text_model(&fixtures().join("clip_l"), None, DType::F32, &dev).unwrap();
    let tokenizer = ClipTokenizer::from_folder(fixtures().join("tokenizer/folder_vocab_merges")).unwrap();
    StableDiffusion {
        unet: diffusers_folder::load_unet(&fixtures().join("sd15"), None, DType::F32, &dev).unwrap(),
        vae: diffusers_folder::load_vae(&fixtures().join("vae"), None, DType::F32, &dev).unwrap(),
        text_encoders: TextEncoders::new(vec![PromptEncoder {
            tokenizer,
            encoder: Encoder::Plain(clip),
            layer: Layer::Normed { skip: 1 },
        }])
        .unwrap(),
        family: ModelFamily::Sd1,
        scheduler_config: serde_json::json!({"_class_name": "PNDMScheduler", "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}),
    }
}

fn request(seed: u64) -> Txt2Img {
    Txt2Img {
        prompt: "a (portrait:1.2) photo <lora:anna:0.7>".into(),
        negative_prompt: "blurry".into(),
        width: 32,
        height: 24,
        steps: 6,
        guidance_scale: 6.0,
        sampler: Sampler::DpmPp2MSdeKarras,
        seed,
    }
}

#[test]
fn txt2img_is_deterministic_and_equals_the_composed_parts() {
    let model = tiny();
    let mut steps = 0;
    let (a, networks) = model
        .txt2img(&request(3), &mut |_| {
            steps += 1;
            Flow::Continue
        })
        .unwrap();
    assert_eq!(steps, 6);
    assert_eq!(a.dims(), &[1, 3, 24, 32]);
    assert_eq!(networks.len(), 1);
    let (min, max) =
        (a.min_all().unwrap().to_scalar::<f32>().unwrap(), a.max_all().unwrap().to_scalar::<f32>().unwrap());
    assert!((0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max) && max - min > 0.1);
    let (b, _) = model.txt2img(&request(3), &mut |_| Flow::Continue).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0, "same seed, same image");
    let (c, _) = model.txt2img(&request(4), &mut |_| Flow::Continue).unwrap();
    assert!(max_abs_diff(&a, &c) > 0.05, "another seed, another image");

    // By hand: the same conditioning, seeded noise stream, scheduler and loop.
    let r = request(3);
    let (text, _) = model.text_encoders.conditioning(&r.prompt, &r.negative_prompt).unwrap();
    let mut scheduler = r.sampler.config(&model.scheduler_config).unwrap().build().unwrap();
    let mut noise = SeededNoise::new(3);
    let initial = noise.randn((1, 4, 12, 16), DType::F32, &Device::Cpu).unwrap();
    let options = SamplingOptions { num_inference_steps: 6, guidance_scale: 6.0 };
    let latents =
        denoise(&model.unet, scheduler.as_mut(), &text, Start::Noise(initial), None, &options, &mut noise, &mut |_| {
            Flow::Continue
        })
        .unwrap();
    assert_eq!(max_abs_diff(&decode_latents(&model.vae, &latents).unwrap(), &a), 0.0);
}

#[test]
fn sizes_the_model_cannot_take_are_errors() {
    let mut r = request(0);
    r.width = 30;
    let err = tiny().txt2img(&r, &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, DiffusionError::InvalidInput { name: "width", .. }), "{err:?}");
}

#[test]
fn whole_sd1_single_file_loads_with_the_embedded_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = ldm_tensors("sd15");
    tensors.extend(ldm_tensors("clip_l_sd15"));
    let path = write_checkpoint(dir.path(), "tiny-sd15.safetensors", &tensors);
    let model = StableDiffusion::load(&path, 1, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.family, ModelFamily::Sd1);
    // The tiny text encoder knows 1000 tokens; the real CLIP vocabulary has 49408, so a real
    // prompt is refused with a typed error instead of an out-of-range lookup.
    let err = model.txt2img(&request(0), &mut |_| Flow::Continue).unwrap_err();
    assert!(matches!(err, DiffusionError::InvalidInput { .. }), "{err:?}");
}
