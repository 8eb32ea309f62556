//! Wall time per image of the creative path (SDXL txt2img with the user's LoRA attached, display
//! score, PNG write) on the tiny random SDXL parts of the lora and diffusion crates' fixtures;
//! `tools/bench/creative_sdxl_torch.py` times diffusers on the same parts and LoRA.
//!
//! `cargo run --release -p easyphoto-pipeline --example bench_creative -- <size> <steps> <runs>`
//! (needs ORT_DYLIB_PATH; candle uses every core unless RAYON_NUM_THREADS is set).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use easyphoto_face::{FaceRes, Mtcnn};
use easyphoto_pipeline::creative::{CreativeComponents, CreativeConfig, create, load_sdxl};
use easyphoto_pipeline::{CancelToken, Silent, UserId, UserStore, write_atomic};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let [size, steps, runs] = args[..] else { anyhow::bail!("usage: bench_creative <size> <steps> <runs>") };
    let crates = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny-sdxl");
    std::fs::create_dir_all(&model)?;
    let tokenizer = crates.join("diffusion/tests/fixtures/tokenizer/folder_vocab_merges");
    for (name, target) in [
        ("unet", crates.join("lora/tests/fixtures/apply/sdxl_unet")),
        ("vae", crates.join("diffusion/tests/fixtures/vae")),
        ("text_encoder", crates.join("lora/tests/fixtures/apply/sdxl_te1")),
        ("text_encoder_2", crates.join("lora/tests/fixtures/apply/sdxl_te2")),
        ("tokenizer", tokenizer.clone()),
        ("tokenizer_2", tokenizer),
    ] {
        std::os::unix::fs::symlink(target.canonicalize()?, model.join(name))?;
    }
    let store = UserStore::new(dir.path().join("root"));
    let id = UserId::new("bench")?;
    let photo = std::fs::read(crates.join("face/tests/assets/astronaut.png"))?;
    write_atomic(&store.reference_image(&id), &photo)?;
    write_atomic(
        &store.lora_path(&id),
        &std::fs::read(crates.join("lora/tests/fixtures/apply/sdxl_kohya.safetensors"))?,
    )?;
    let mut components = CreativeComponents {
        sd: load_sdxl(&model, DType::F32, &Device::Cpu)?,
        detector: Box::new(Mtcnn::new(1)?),
        embedder: Box::new(FaceRes::load(crates.join("face/tests/assets/human_faceres.onnx"), 1)?),
    };
    let mut times = vec![];
    for seed in 0..=runs as i64 {
        let config = CreativeConfig {
            text_to_image_width: size as u32,
            text_to_image_height: size as u32,
            diffusion_steps: steps as u32,
            seed,
            ..CreativeConfig::default()
        };
        let start = Instant::now();
        create(&store, &id, None, &mut components, &config, &dir.path().join("out"), &Silent, &CancelToken::new())?;
        if seed > 0 {
            times.push(start.elapsed().as_secs_f64()); // the first call warms up
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!("easyphoto-rs creative {size}x{size}, {steps} steps: median {median:.3} s per image ({runs} runs)");
    Ok(())
}
