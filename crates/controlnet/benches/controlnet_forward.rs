//! Times one full-size SD 1.5 ControlNet forward (random weights; batch 2 for classifier-free
//! guidance, 64×64 latents, 77 text tokens, a 512² conditioning image) and prints the median of
//! the timed runs (wall and process CPU time) as one JSON line; `EASYPHOTO_PROFILE=1` adds the
//! per-op table of each run. `tools/reference/controlnet_bench.py` is the diffusers side.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p easyphoto-controlnet --bench controlnet_forward -- 3
//! OMP_NUM_THREADS=2 .venv-ref/bin/python tools/reference/controlnet_bench.py --runs 3 --threads 2
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use easyphoto_controlnet::{ControlNetConfig, ControlNetModel};
use easyphoto_diffusion::UNetConditioning;
use easyphoto_diffusion::cpu::profile;
use easyphoto_diffusion::weights::random_var_builder;

fn main() -> anyhow::Result<()> {
    // The recommended allocator setting for model inference (see its docs).
    easyphoto_diffusion::cpu::keep_freed_memory();
    // `cargo bench` passes `--bench`; the first number on the command line is the run count.
    let runs = std::env::args().skip(1).find_map(|a| a.parse::<usize>().ok()).unwrap_or(3);
    let device = Device::Cpu;
    // The SD 1.5 ControlNets' config.json (lllyasviel/control_v11p_sd15_canny): diffusers'
    // defaults with CLIP-L's 768-wide context.
    let config = ControlNetConfig { cross_attention_dim: 768, ..Default::default() };
    let model = ControlNetModel::new(random_var_builder(DType::F32, &device), &config)?;
    let sample = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &device)?;
    let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &device)?;
    let image = Tensor::rand(0f32, 1.0, (2, 3, 512, 512), &device)?;
    let t = Tensor::new(&[999f32, 999.0], &device)?;
    let cond = UNetConditioning::default();
    let run = || model.forward(&sample, &t, &context, &image, &cond);
    run()?;
    let (mut times, mut cpu) = (vec![], vec![]);
    for _ in 0..runs {
        profile::reset();
        let (start, cpu_start) = (Instant::now(), profile::process_cpu_time());
        run()?;
        times.push(start.elapsed().as_secs_f64());
        cpu.push((profile::process_cpu_time() - cpu_start).as_secs_f64());
        if profile::enabled() {
            eprintln!("{}", profile::report(start.elapsed()));
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let round = |v: &[f64]| v.iter().map(|t| (t * 1000.0).round() / 1000.0).collect::<Vec<_>>();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "{{\"impl\": \"easyphoto-rs\", \"model\": \"controlnet-sd15\", \"threads\": \"{threads}\", \"median_s\": {:.3}, \"times_s\": {:?}, \"median_cpu_s\": {:.2}, \"cpu_s\": {:?}}}",
        median(&times),
        round(&times),
        median(&cpu),
        round(&cpu)
    );
    Ok(())
}
