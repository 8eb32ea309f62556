//! Peak memory and wall time of the infer flow at full size: an SD1.5 UNet, VAE and CLIP-L and the
//! four ControlNets (canny, shared by both passes, openpose and colour for the first, tile for the
//! second) with random weights (configs in tools/bench/configs), a rank-128 user LoRA, the real
//! face models, one template (a 512 × 512 face crop), few sampler steps. Prints the stage times, the
//! peak resident memory after loading and of each step of the flow, and one JSON line.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p easyphoto-pipeline --example bench_infer_sd15 -- f32
//! RAYON_NUM_THREADS=2 cargo run --release -p easyphoto-pipeline --example bench_infer_sd15 -- f16
//! ```
//! `f16` / `bf16` keep every linear and convolution weight in that type and compute in f32
//! (`easyphoto_diffusion::cpu::set_weight_dtype`). Needs `ORT_DYLIB_PATH` (see tools/test.sh).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use easyphoto_controlnet::{ControlNetConfig, ControlNetModel};
use easyphoto_diffusion::diffusers_folder::read_config;
use easyphoto_diffusion::text_encoding::{Encoder, Layer, PromptEncoder, TextEncoders};
use easyphoto_diffusion::weights::random_var_builder;
use easyphoto_diffusion::{
    AutoencoderKL, CLIPTextModel, ClipTokenizer, LayerMut, ModelFamily, PadToken, StableDiffusion,
    UNet2DConditionModel, VisitLayers,
};
use easyphoto_face::{FaceMesh, FaceRes, Mtcnn, load_rgb};
use easyphoto_lora::{KohyaPrefix, kohya_name};
use easyphoto_pipeline::components::{Components, PoseModel};
use easyphoto_pipeline::infer::{UserAssets, infer_template};
use easyphoto_pipeline::{CancelToken, InferConfig, Progress, UserId, UserStore};

/// `VmHWM` (peak) or `VmRSS` (current) of this process, in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kib.unwrap_or(f64::NAN) / 1024.0
}

/// Resets the peak to the current resident size (Linux `clear_refs` 5); false where refused.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn main() -> anyhow::Result<()> {
    let weights = match std::env::args().nth(1).as_deref() {
        None | Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => anyhow::bail!("unknown weight type {other} (f32, f16, bf16)"),
    };
    easyphoto_diffusion::cpu::set_weight_dtype(Some(weights));
    let dtype = DType::F32;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let configs = root.join("tools/bench/configs");
    let assets = root.join("crates/face/tests/assets");
    let device = Device::Cpu;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let start = Instant::now();

    let vb = || random_var_builder(dtype, &device);
    let unet = UNet2DConditionModel::new(vb(), &read_config(&configs.join("sd15_unet.json"))?)?;
    let vae = AutoencoderKL::new(vb(), &read_config(&configs.join("sd15_vae.json"))?)?;
    let clip = CLIPTextModel::new(vb(), &read_config(&configs.join("clip_l.json"))?)?;
    let text_encoders = TextEncoders::new(vec![PromptEncoder {
        tokenizer: ClipTokenizer::embedded(PadToken::EndOfText)?,
        encoder: Encoder::Plain(clip),
        layer: Layer::Normed { skip: 1 },
    }])?;
    let scheduler_config = serde_json::json!({
        "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "prediction_type": "epsilon",
    });
    let sd = StableDiffusion { unet, vae, text_encoders, family: ModelFamily::Sd1, scheduler_config };
    // The SD1.5 ControlNets' config (lllyasviel/control_v11p_sd15_*): diffusers' defaults, CLIP-L context.
    let controlnet_config = ControlNetConfig { cross_attention_dim: 768, ..Default::default() };
    let controlnet =
        || -> anyhow::Result<Arc<ControlNetModel>> { Ok(Arc::new(ControlNetModel::new(vb(), &controlnet_config)?)) };
    let mut c = Components {
        sd,
        canny: controlnet()?,
        openpose: controlnet()?,
        color: controlnet()?,
        tile: controlnet()?,
        pose: PoseModel::MoveNet(easyphoto_controlnet::preprocess::openpose::MoveNet::load_in(
            root.join("crates/controlnet/assets/human_movenet-lightning.onnx"),
            &easyphoto_face::environment()?,
        )?),
        detector: Box::new(Mtcnn::new(threads)?),
        parser: Box::new(FaceMesh::embedded(threads)?),
        embedder: Box::new(FaceRes::load(assets.join("human_faceres.onnx"), threads)?),
        style_lora: None,
        device: device.clone(),
    };
    let load_s = start.elapsed().as_secs_f64();
    let loaded_mib = status_mib("VmHWM:");

    let tmp = tempfile::tempdir()?;
    let store = UserStore::new(tmp.path());
    let id = UserId::new("bench")?;
    let reference = store.reference_image(&id);
    std::fs::create_dir_all(reference.parent().unwrap_or(tmp.path()))?;
    load_rgb(assets.join("faceapi_sample2_640.png"))?.save(&reference)?;
    let lora = store.lora_path(&id);
    std::fs::create_dir_all(lora.parent().unwrap_or(tmp.path()))?;
    write_lora(&mut c, &lora, 128)?;
    let users = [Some(UserAssets::load(&store, &id, &c)?)];
    let template = load_rgb(assets.join("astronaut.png"))?;
    // 4 × 0.5 = 2 executed steps per pass (EasyPhoto runs 22 and 6).
    let config = InferConfig {
        first_diffusion_steps: 4,
        first_denoising_strength: 0.5,
        second_diffusion_steps: 4,
        second_denoising_strength: 0.5,
        seed: 1,
        ..InferConfig::default()
    };

    // The peak of each step of the flow (the peak is reset whenever the message changes).
    let can_reset = reset_peak();
    let peaks: Mutex<Vec<(String, f64)>> = Mutex::new(Vec::new());
    let observer = |p: Progress<'_>| {
        let mut peaks = peaks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if peaks.last().is_none_or(|(m, _)| m != p.message) {
            if let Some(last) = peaks.last_mut() {
                last.1 = status_mib("VmHWM:");
            }
            reset_peak();
            peaks.push((p.message.to_string(), f64::NAN));
        }
    };
    let run_start = Instant::now();
    let result = infer_template(&template, "astronaut", &users, &mut c, &config, 1, &observer, &CancelToken::new())?;
    let wall = run_start.elapsed().as_secs_f64();
    let mut peaks = peaks.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(last) = peaks.last_mut() {
        last.1 = status_mib("VmHWM:");
    }
    let t = result.times;
    println!(
        "full-size SD1.5 infer flow, {weights:?} weights (f32 compute), {threads} threads: weights built in {load_s:.1} s, peak {loaded_mib:.0} MiB after loading"
    );
    println!(
        "one template ({}x{}), 2 + 2 sampler steps: wall {wall:.1} s | face {:.1} | preprocessors {:.1} | diffusion {:.1} | post {:.1} s",
        template.width(),
        template.height(),
        t.face.as_secs_f64(),
        t.preprocess.as_secs_f64(),
        t.diffusion.as_secs_f64(),
        t.post.as_secs_f64()
    );
    if can_reset {
        for (message, peak) in &peaks {
            println!("  peak {peak:7.0} MiB  {message}");
        }
    }
    let overall = peaks.iter().map(|p| p.1).fold(loaded_mib, f64::max);
    println!(
        "{{\"impl\": \"easyphoto-rs\", \"weights\": \"{weights:?}\", \"threads\": {threads}, \"peak_rss_mib\": {overall:.0}, \"loaded_rss_mib\": {loaded_mib:.0}, \"wall_s\": {wall:.1}, \"diffusion_s\": {:.1}}}",
        t.diffusion.as_secs_f64()
    );
    Ok(())
}

/// A kohya LoRA of `rank` on every attention projection of the UNet and the text encoder (the
/// size of EasyPhoto's rank-128 user LoRAs), with small seeded values.
fn write_lora(c: &mut Components, path: &Path, rank: usize) -> anyhow::Result<()> {
    let mut tensors = std::collections::HashMap::new();
    let mut failure = None;
    let mut add = |prefix: KohyaPrefix, layer: LayerMut<'_>| {
        let LayerMut::Linear(l) = layer else { return };
        let path = l.path().to_string();
        let attention = ["to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj"];
        if !attention.iter().any(|s| path.ends_with(s)) {
            return;
        }
        let result = (|| -> candle_core::Result<()> {
            let (out, inp) = l.weight().dims2()?;
            let name = kohya_name(prefix, &path);
            let down = Tensor::randn(0f32, 0.01, (rank, inp), &Device::Cpu)?;
            let up = Tensor::randn(0f32, 0.01, (out, rank), &Device::Cpu)?;
            tensors.insert(format!("{name}.lora_down.weight"), down);
            tensors.insert(format!("{name}.lora_up.weight"), up);
            tensors.insert(format!("{name}.alpha"), Tensor::new(rank as f32 / 2.0, &Device::Cpu)?);
            Ok(())
        })();
        if let Err(e) = result {
            failure.get_or_insert(e);
        }
    };
    c.sd.unet.visit_layers(&mut |layer| add(KohyaPrefix::Unet, layer));
    if let Some(te) = c.sd.text_encoders.encoders_mut().next() {
        te.visit_layers(&mut |layer| add(KohyaPrefix::TextEncoder, layer));
    }
    if let Some(e) = failure {
        return Err(e.into());
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}
