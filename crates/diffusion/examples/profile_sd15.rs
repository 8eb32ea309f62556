//! Time per operation kind of one full-size SD1.5 UNet forward (batch 2, 64×64 latents) or VAE
//! decode (512²), random weights, f32 on the CPU. Run with the profiler on:
//!
//! ```sh
//! EASYPHOTO_PROFILE=1 RAYON_NUM_THREADS=2 cargo run --release -p easyphoto-diffusion \
//!     --example profile_sd15 -- unet
//! ```
//!
//! `EASYPHOTO_CPU_KERNELS=0` profiles the plain candle path instead.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use easyphoto_diffusion::cpu::profile;
use easyphoto_diffusion::diffusers_folder::read_config;
use easyphoto_diffusion::weights::random_var_builder;
use easyphoto_diffusion::{AutoencoderKL, UNet2DConditionModel};

fn main() -> anyhow::Result<()> {
    easyphoto_diffusion::cpu::keep_freed_memory();
    let model = std::env::args().nth(1).unwrap_or_else(|| "unet".into());
    let runs: usize = std::env::args().nth(2).map_or(Ok(1), |r| r.parse())?;
    let configs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/bench/configs");
    let device = Device::Cpu;
    let vb = random_var_builder(DType::F32, &device);
    let mut run: Box<dyn FnMut() -> anyhow::Result<Tensor>> = match model.as_str() {
        "unet" => {
            let unet = UNet2DConditionModel::new(vb, &read_config(&configs.join("sd15_unet.json"))?)?;
            let sample = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &device)?;
            let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &device)?;
            let t = Tensor::new(&[999f32, 999.], &device)?;
            Box::new(move || Ok(unet.forward(&sample, &t, &context, &Default::default())?))
        }
        "vae-decode" => {
            let vae = AutoencoderKL::new(vb, &read_config(&configs.join("sd15_vae.json"))?)?;
            let latents = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &device)?;
            Box::new(move || Ok(vae.decode(&latents)?))
        }
        other => anyhow::bail!("unknown model {other} (unet | vae-decode)"),
    };
    run()?;
    for _ in 0..runs {
        profile::reset();
        let (start, cpu0) = (Instant::now(), profile::process_cpu_time());
        run()?;
        let (wall, cpu) = (start.elapsed(), profile::process_cpu_time() - cpu0);
        let threads = rayon::current_num_threads();
        println!("{model}, {threads} threads, kernels {}:", easyphoto_diffusion::cpu::enabled());
        print!("{}", profile::report(wall));
        println!(
            "cpu time {:.1} s = {:.1} s per thread (wall {:.1} s)",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() / threads as f64,
            wall.as_secs_f64()
        );
    }
    Ok(())
}
