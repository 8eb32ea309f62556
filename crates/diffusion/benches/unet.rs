//! Criterion benches of the full-size SD1.5 UNet (batch 2, 64×64 latents: one CFG step at 512²)
//! and VAE decode (512²), with random weights, on the CPU. `tools/bench/compare.sh` times the
//! same configs against PyTorch; see BENCHMARKS.md.
//!
//! `cargo bench -p easyphoto-diffusion --bench unet`

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use easyphoto_diffusion::diffusers_folder::read_config;
use easyphoto_diffusion::weights::random_var_builder;
use easyphoto_diffusion::{AutoencoderKL, UNet2DConditionModel};

fn configs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench/configs")
}

fn sd15(c: &mut Criterion) {
    let device = Device::Cpu;
    let mut group = c.benchmark_group("sd15");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(60));

    let unet = UNet2DConditionModel::new(
        random_var_builder(DType::F32, &device),
        &read_config(&configs().join("sd15_unet.json")).unwrap(),
    )
    .unwrap();
    let sample = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &device).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &device).unwrap();
    let t = Tensor::new(&[999f32, 999.], &device).unwrap();
    group.bench_function("unet_forward_b2_64x64", |b| {
        b.iter(|| unet.forward(&sample, &t, &context, &Default::default()).unwrap())
    });
    drop(unet);

    let vae = AutoencoderKL::new(
        random_var_builder(DType::F32, &device),
        &read_config(&configs().join("sd15_vae.json")).unwrap(),
    )
    .unwrap();
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &device).unwrap();
    group.bench_function("vae_decode_512", |b| b.iter(|| vae.decode(&latents).unwrap()));
    group.finish();
}

criterion_group!(benches, sd15);
criterion_main!(benches);
