//! The sampling loop's own cost (issue 4): the full txt2img on the tiny test model (prompt
//! encoding, 20 DPM++ 2M SDE Karras steps with CFG, VAE decode), and the loop at full-size latent
//! shapes (`[2, 4, 64, 64]` per CFG step) against the bare UNet calls it makes: the difference
//! divided by the steps is the per-step overhead quoted in BENCHMARKS.md.
//!
//! `cargo bench --bench txt2img_loop`

#[path = "../examples/support/tiny_model.rs"]
mod tiny_model;

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use easyphoto::diffusion::sampling::{Flow, SamplingOptions, Start, denoise};
use easyphoto::diffusion::schedulers::Sampler;
use easyphoto::diffusion::{SeededNoise, Txt2Img};

const STEPS: usize = 20;

fn txt2img_loop(c: &mut Criterion) {
    let device = Device::Cpu;
    let model = tiny_model::tiny_model(&device).unwrap();
    let mut group = c.benchmark_group("txt2img_tiny");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(10));

    let request = Txt2Img {
        prompt: "masterpiece, best quality, (a portrait photo:1.2) of a person, outdoors".into(),
        negative_prompt: "(worst quality:2), (low quality:2), lowres, blurry".into(),
        width: 64,
        height: 64,
        steps: STEPS,
        guidance_scale: 7.0,
        sampler: Sampler::DpmPp2MSdeKarras,
        seed: 0,
    };
    group.bench_function("full_txt2img_20_steps", |b| {
        b.iter(|| model.txt2img(&request, &mut |_| Flow::Continue).unwrap())
    });

    // Full-size latent shapes: 64×64 latents (a 512² image), batch 2 for CFG.
    let (text, _) = model.text_encoders.conditioning(&request.prompt, &request.negative_prompt).unwrap();
    group.sample_size(10);
    let initial = SeededNoise::new(3).randn((1, 4, 64, 64), DType::F32, &device).unwrap();
    let options = SamplingOptions { num_inference_steps: STEPS, guidance_scale: 7.0 };
    group.bench_function("denoise_20_steps_64x64_latents", |b| {
        b.iter(|| {
            let mut scheduler = Sampler::DpmPp2MSdeKarras.config(&model.scheduler_config).unwrap().build().unwrap();
            let start = Start::Noise(initial.clone());
            let mut noise = SeededNoise::new(4);
            denoise(&model.unet, scheduler.as_mut(), &text, start, None, &options, &mut noise, &mut |_| Flow::Continue)
                .unwrap()
        })
    });
    let context = Tensor::cat(&[&text.negative_prompt_embeds, &text.prompt_embeds], 0).unwrap();
    let input = Tensor::cat(&[&initial, &initial], 0).unwrap();
    let t = Tensor::new(&[500f32], &device).unwrap();
    group.bench_function("unet_only_20_calls_64x64_latents", |b| {
        b.iter(|| {
            for _ in 0..STEPS {
                model.unet.forward(&input, &t, &context, &Default::default()).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, txt2img_loop);
criterion_main!(benches);
