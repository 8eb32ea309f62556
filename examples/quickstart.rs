//! Runs what easyphoto-rs can do so far on a checkpoint: one denoising pass of the UNet from
//! seeded noise and a VAE decode, written as a PNG. Without arguments it uses the tiny test
//! checkpoint bundled with the repository, so it works on a fresh clone.
//!
//! ```sh
//! cargo run --release --example quickstart
//! cargo run --release --example quickstart -- --checkpoint v1-5-pruned-emaonly.safetensors --out out.png
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use easyphoto::diffusion::{SeededNoise, load_unet, load_vae};
use easyphoto::pipeline::write_atomic;

#[derive(Parser)]
struct Args {
    /// UNet: single-file checkpoint or diffusers folder (default: the tiny test UNet).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// VAE: single-file or diffusers folder (default: the checkpoint's own VAE, or the tiny test VAE).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Latent size (height, width), in latent pixels.
    #[arg(long, default_value_t = 32)]
    latent_size: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value = "quickstart.png")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/diffusion/tests/fixtures");
    let unet_path = args.checkpoint.clone().unwrap_or_else(|| fixtures.join("sd15"));
    let vae_path = args.vae.or(args.checkpoint).unwrap_or_else(|| fixtures.join("vae"));
    let device = Device::Cpu;

    let start = Instant::now();
    let unet =
        load_unet(&unet_path, DType::F32, &device).with_context(|| format!("loading {}", unet_path.display()))?;
    let vae = load_vae(&vae_path, DType::F32, &device).with_context(|| format!("loading {}", vae_path.display()))?;
    println!("loaded UNet {} and VAE {} in {:.2?}", unet_path.display(), vae_path.display(), start.elapsed());

    let channels = unet.config().out_channels;
    let s = args.latent_size;
    let latents = SeededNoise::new(args.seed).randn((1, channels, s, s), DType::F32, &device)?;
    let context_dim = match &unet.config().cross_attention_dim {
        easyphoto::diffusion::unet_2d_condition::PerBlock::All(d) => *d,
        easyphoto::diffusion::unet_2d_condition::PerBlock::Each(d) => d[0],
    };
    // An empty-prompt stand-in until the text encoders land: zeros for the text states.
    let context = Tensor::zeros((1, 77, context_dim), DType::F32, &device)?;
    let t = Tensor::new(&[999f32], &device)?;
    let start = Instant::now();
    let eps = unet.forward(&latents, &t, &context, &Default::default())?;
    println!("UNet forward on {:?} in {:.2?}", latents.dims(), start.elapsed());

    // One DDPM-style x0 estimate at the last training step (alphas_cumprod ≈ 0.0047 for SD).
    let alpha_bar: f64 = 0.0047;
    let x0 = ((latents - (eps * (1.0 - alpha_bar).sqrt())?)? / alpha_bar.sqrt())?;
    let start = Instant::now();
    let image = vae.decode(&(x0 / vae.scaling_factor())?)?;
    println!("VAE decode to {:?} in {:.2?}", image.dims(), start.elapsed());

    let image = ((image.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.to_dtype(DType::U8)?.squeeze(0)?.permute((1, 2, 0))?;
    let (h, w, _) = image.dims3()?;
    let pixels = image.flatten_all()?.to_vec1::<u8>()?;
    let buffer = image::RgbImage::from_raw(w as u32, h as u32, pixels).context("image buffer")?;
    let mut png = std::io::Cursor::new(vec![]);
    buffer.write_to(&mut png, image::ImageFormat::Png)?;
    write_atomic(&args.out, png.get_ref())?;
    println!("wrote {}", args.out.display());
    Ok(())
}
