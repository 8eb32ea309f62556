//! Times the full-size SD1.5 UNet forward (batch 2 for classifier-free guidance, 64×64 latents),
//! the VAE decode of a 512² image, and the CLIP-L encoding of a 150-token prompt (two 77-token
//! chunks, the WebUI's way), with random weights, and reports medians and peak memory as one JSON
//! line. `tools/bench/compare.sh` runs it beside the PyTorch equivalent.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release --example bench_sd15 -- unet --runs 3
//! ```

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Parser, ValueEnum};
use easyphoto::diffusion::diffusers_folder::read_config;
use easyphoto::diffusion::text_encoding::{Encoder, Layer, PromptEncoder, TextEncoders};
use easyphoto::diffusion::weights::random_var_builder;
use easyphoto::diffusion::{AutoencoderKL, CLIPTextModel, ClipTokenizer, PadToken, UNet2DConditionModel};

#[derive(Clone, Copy, ValueEnum)]
enum Model {
    Unet,
    VaeDecode,
    ClipL,
}

/// Words of one CLIP token each; 150 of them make the two-chunk prompt of the CLIP-L benchmark.
const ONE_TOKEN_WORDS: [&str; 6] = ["a", "portrait", "photo", "of", "person", "outdoors"];

#[derive(Parser)]
struct Args {
    model: Model,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The dtype of the model (f16 / bf16: weights and activations in that dtype, the linear and
    /// convolution kernels computing in f32).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// How an f32 model keeps its linear and convolution weights (`cpu::set_weight_dtype`).
    #[arg(long, default_value = "f32")]
    weights: Precision,
}

#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    F32,
    F16,
    Bf16,
}

impl From<Precision> for DType {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kib.unwrap_or(f64::NAN) / 1024.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The recommended allocator setting for model inference (see its docs).
    easyphoto::diffusion::cpu::keep_freed_memory();
    let configs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/bench/configs");
    let device = Device::Cpu;
    let dtype = DType::from(args.dtype);
    easyphoto::diffusion::cpu::set_weight_dtype(Some(args.weights.into()));
    let vb = random_var_builder(dtype, &device);
    let rss_before = peak_rss_mib();
    let mut run: Box<dyn FnMut() -> anyhow::Result<Tensor>> = match args.model {
        Model::Unet => {
            let unet = UNet2DConditionModel::new(vb, &read_config(&configs.join("sd15_unet.json"))?)?;
            let sample = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &device)?.to_dtype(dtype)?;
            let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &device)?.to_dtype(dtype)?;
            let t = Tensor::new(&[999f32, 999.], &device)?;
            Box::new(move || Ok(unet.forward(&sample, &t, &context, &Default::default())?))
        }
        Model::VaeDecode => {
            let vae = AutoencoderKL::new(vb, &read_config(&configs.join("sd15_vae.json"))?)?;
            let latents = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &device)?.to_dtype(dtype)?;
            Box::new(move || Ok(vae.decode(&latents)?))
        }
        Model::ClipL => {
            let clip = CLIPTextModel::new(vb, &read_config(&configs.join("clip_l.json"))?)?;
            let encoder = PromptEncoder {
                tokenizer: ClipTokenizer::embedded(PadToken::EndOfText)?,
                encoder: Encoder::Plain(clip),
                layer: Layer::Normed { skip: 1 },
            };
            let prompt = ONE_TOKEN_WORDS.iter().cycle().take(150).copied().collect::<Vec<_>>().join(" ");
            let tokens = encoder.tokenizer.encode(&prompt)?.len();
            anyhow::ensure!(tokens == 150, "the benchmark prompt has {tokens} tokens, not 150");
            let encoders = TextEncoders::new(vec![encoder])?;
            Box::new(move || Ok(encoders.encode(&prompt)?.states))
        }
    };
    let weights_mib = peak_rss_mib() - rss_before;
    run()?;
    let times: Vec<f64> = (0..args.runs)
        .map(|_| {
            let start = Instant::now();
            run().map(|_| start.elapsed().as_secs_f64())
        })
        .collect::<anyhow::Result<_>>()?;
    println!(
        "{{\"impl\": \"easyphoto-rs\", \"threads\": {}, \"dtype\": \"{dtype:?}\", \"weights\": \"{:?}\", \"median_s\": {:.3}, \"times_s\": {:?}, \"peak_rss_mib\": {:.0}, \"weights_mib\": {:.0}}}",
        candle_core::utils::get_num_threads(),
        DType::from(args.weights),
        median(times.clone()),
        times.iter().map(|t| (t * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        peak_rss_mib(),
        weights_mib
    );
    Ok(())
}
