//! txt2img from a checkpoint as users download it (single-file `.safetensors` / `.ckpt`, or a
//! diffusers pipeline folder), with A1111 prompt syntax and EasyPhoto's default sampler.
//! Without `--checkpoint` it runs the tiny test model shipped in the repository, so it works on a
//! fresh clone (the picture is noise-like: the tiny model has random weights).
//!
//! ```sh
//! cargo run --release --example txt2img
//! cargo run --release --example txt2img -- --checkpoint chilloutmix.safetensors \
//!     --prompt "masterpiece, best quality, (portrait:1.2) of a woman" --seed 7 --out portrait.png
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use easyphoto::diffusion::sampling::Flow;
use easyphoto::diffusion::schedulers::Sampler;
use easyphoto::diffusion::{StableDiffusion, Txt2Img};
use easyphoto::pipeline::write_atomic;

#[path = "support/tiny_model.rs"]
mod tiny_model;
use tiny_model::tiny_model;

#[derive(Parser)]
struct Args {
    /// Single-file checkpoint or diffusers pipeline folder (default: the tiny test model).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value = "masterpiece, best quality, (a portrait photo:1.2) of a person, outdoors")]
    prompt: String,
    #[arg(long, default_value = "(worst quality:2), (low quality:2), lowres, blurry")]
    negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.0)]
    guidance: f64,
    /// An A1111 sampler name: "DPM++ 2M SDE Karras", "Euler a", "DDIM", ...
    #[arg(long, default_value = "DPM++ 2M SDE Karras")]
    sampler: Sampler,
    /// Image size (default: 512, or 64 for the tiny test model).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// A1111's clip skip for SD1.x models (1 = off).
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    #[arg(long, default_value = "txt2img.png")]
    out: PathBuf,
}

fn to_png(image: &Tensor) -> anyhow::Result<Vec<u8>> {
    let image = (image.squeeze(0)?.permute((1, 2, 0))? * 255.0)?.round()?.to_dtype(DType::U8)?;
    let (h, w, _) = image.dims3()?;
    let buffer =
        image::RgbImage::from_raw(w as u32, h as u32, image.flatten_all()?.to_vec1::<u8>()?).context("image buffer")?;
    let mut png = std::io::Cursor::new(vec![]);
    buffer.write_to(&mut png, image::ImageFormat::Png)?;
    Ok(png.into_inner())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = Device::Cpu;
    let start = Instant::now();
    let (model, default_size) = match &args.checkpoint {
        Some(path) => (
            StableDiffusion::load(path, args.clip_skip, DType::F32, &device)
                .with_context(|| format!("loading {}", path.display()))?,
            512,
        ),
        None => (tiny_model(&device)?, 64),
    };
    println!("loaded a {:?} model in {:.2?}", model.family, start.elapsed());

    let request = Txt2Img {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        width: args.width.unwrap_or(default_size),
        height: args.height.unwrap_or(default_size),
        steps: args.steps,
        guidance_scale: args.guidance,
        sampler: args.sampler,
        seed: args.seed,
    };
    let start = Instant::now();
    let mut progress = |p: &easyphoto::diffusion::sampling::Progress| {
        eprint!("\rstep {}/{}", p.step, p.total);
        Flow::Continue
    };
    let (image, networks) = model.txt2img(&request, &mut progress)?;
    eprintln!();
    if !networks.is_empty() {
        println!("the prompt names networks that this example does not apply yet: {networks:?}");
    }
    println!("{} steps of {} in {:.2?}", request.steps, request.sampler, start.elapsed());
    write_atomic(&args.out, &to_png(&image)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
