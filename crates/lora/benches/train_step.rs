//! One LoRA training step (forward + backward + grad clipping + AdamW) at batch 1 on a mid-size
//! UNet (`benches/mid_unet.json`: blocks 128/256/256, cross dim 768, 32×32 latents, 77 text
//! tokens) with EasyPhoto's rank-128 / alpha-64 LoRA on the transformer blocks, random weights,
//! f32. Prints one JSON line: median step time (wall and CPU) and peak RSS. The PyTorch + peft side is
//! `tools/reference/lora_bench_train.py` (same config, shapes and reporting).
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p easyphoto-lora --bench train_step`   (env: RUNS=5; candle's
//! element-wise pool is set to one thread unless `CANDLE_NUM_THREADS` says otherwise;
//! `UNET_CONFIG=path/to/config.json` for another UNet, with latents of its `sample_size`, such
//! as `tools/bench/configs/sd15_unet.json`: full-size SD1.5 at 512²)

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use easyphoto_diffusion::UNet2DConditionModel;
use easyphoto_diffusion::diffusers_folder::read_config;
use easyphoto_diffusion::schedulers::DdpmScheduler;
use easyphoto_diffusion::weights::random_var_builder;
use easyphoto_lora::adamw::{AdamW, clip_grad_norm};
use easyphoto_lora::{LoraNetwork, Targets, TrainConfig, diffusion_loss};
use rand::SeedableRng;

fn main() {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { easyphoto_diffusion::cpu::serial_candle_pool() };
    // Freed outputs stay in the heap for the next op (the diffusion crate's cpu::alloc).
    easyphoto_diffusion::cpu::keep_freed_memory();
    let device = Device::Cpu;
    let config_path = std::env::var_os("UNET_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/mid_unet.json"));
    let unet_config = read_config(&config_path).unwrap();
    let mut unet = UNet2DConditionModel::new(random_var_builder(DType::F32, &device), &unet_config).unwrap();
    let side = unet_config.sample_size.expect("the UNet config gives its sample_size");
    let weights_mib = peak_rss_mib();
    let config = TrainConfig::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut targets = Targets { unet: Some(&mut unet), ..Default::default() };
    let network = LoraNetwork::new(&mut targets, config.rank, config.network_alpha, &mut rng).unwrap();
    network.attach(&mut targets, 1.0);
    let params: Vec<(&Var, f64)> =
        network.modules().iter().flat_map(|m| [(&m.down, config.unet_lr), (&m.up, config.unet_lr)]).collect();
    let vars: Vec<&Var> = params.iter().map(|(p, _)| *p).collect();
    let mut optimizer = AdamW::new(config.adam, &vars).unwrap();
    let scheduler = DdpmScheduler::new(config.noise_scheduler.clone()).unwrap();
    let latents = Tensor::randn(0f32, 1.0, (1, 4, side, side), &device).unwrap();
    let noise = Tensor::randn(0f32, 1.0, (1, 4, side, side), &device).unwrap();
    let hidden = Tensor::randn(0f32, 1.0, (1, 77, 768), &device).unwrap();
    let runs: usize = std::env::var("RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);

    let mut step = || {
        let loss = diffusion_loss(&unet, &scheduler, &latents, &noise, &[500], &hidden, &Default::default()).unwrap();
        let grads = loss.backward().unwrap();
        let mut grads: Vec<Tensor> = params.iter().map(|(p, _)| grads.get(p.as_tensor()).unwrap().clone()).collect();
        clip_grad_norm(&mut grads, config.max_grad_norm).unwrap();
        optimizer.step(&params, &grads).unwrap();
    };
    step();
    let (mut times, mut cpu) = (vec![], vec![]);
    for _ in 0..runs {
        let (start, cpu_start) = (Instant::now(), easyphoto_diffusion::cpu::profile::process_cpu_time().as_secs_f64());
        step();
        times.push(start.elapsed().as_secs_f64());
        cpu.push(easyphoto_diffusion::cpu::profile::process_cpu_time().as_secs_f64() - cpu_start);
    }
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    println!(
        "{{\"bench\": \"lora_train_step_{}_b1\", \"impl\": \"easyphoto-rs\", \"modules\": {}, \"median_s\": {:.3}, \"cpu_median_s\": {:.2}, \"times_s\": {:?}, \"peak_rss_mib\": {}, \"weights_mib\": {}}}",
        config_path.file_stem().map_or("unet".into(), |s| s.to_string_lossy()),
        network.modules().len(),
        times[times.len() / 2],
        cpu[cpu.len() / 2],
        times.iter().map(|t| (t * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        peak_rss_mib(),
        weights_mib
    );
}

/// Peak resident memory of this process (`VmHWM`), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}
