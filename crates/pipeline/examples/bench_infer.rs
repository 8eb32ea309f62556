//! Wall time of the infer flow per template on the tiny random SD1.5 / ControlNet components
//! (EasyPhoto's 50 / 20 steps, crop short side 128), with the real face models, split by stage.
//!
//! `cargo run --release -p easyphoto-pipeline --example bench_infer -- [runs]`
//! (needs `ORT_DYLIB_PATH`, see tools/test.sh).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use easyphoto_diffusion::{LayerMut, VisitLayers};
use easyphoto_face::load_rgb;
use easyphoto_lora::{KohyaPrefix, kohya_name};
use easyphoto_pipeline::components::{ComponentPaths, Components, EmbedderPath, PoseModelPath};
use easyphoto_pipeline::infer::{StageTimes, UserAssets, infer_template};
use easyphoto_pipeline::{CancelToken, InferConfig, Silent, UserId, UserStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args().nth(1).map_or(Ok(3), |a| a.parse())?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir()?;
    let base = tiny_base(&root.join("diffusion/tests/fixtures"), tmp.path())?;
    let controlnet = root.join("controlnet/tests/fixtures/sd15_controlnet");
    let paths = ComponentPaths {
        base,
        vae: None,
        canny: controlnet.clone(),
        openpose: controlnet.clone(),
        color: controlnet.clone(),
        tile: controlnet,
        pose: PoseModelPath::MoveNet(root.join("controlnet/assets/human_movenet-lightning.onnx")),
        detector: None,
        embedder: EmbedderPath::FaceRes(root.join("face/tests/assets/human_faceres.onnx")),
        style_lora: None,
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut c = Components::load(&paths, DType::F32, &Device::Cpu, threads)?;

    let store = UserStore::new(tmp.path().join("data"));
    let id = UserId::new("bench")?;
    let reference = store.reference_image(&id);
    std::fs::create_dir_all(reference.parent().unwrap_or(tmp.path()))?;
    load_rgb(root.join("face/tests/assets/faceapi_sample2_640.png"))?.save(&reference)?;
    let lora = store.lora_path(&id);
    std::fs::create_dir_all(lora.parent().unwrap_or(tmp.path()))?;
    write_lora(&mut c, &lora)?;
    let users = [Some(UserAssets::load(&store, &id, &c)?)];
    let template = load_rgb(root.join("face/tests/assets/astronaut.png"))?;
    let config = InferConfig { short_side: 128, seed: 1, ..InferConfig::default() };

    println!(
        "infer flow, tiny components, {}x{} template, crop short side {}, {} / {} steps, {threads} threads",
        template.width(),
        template.height(),
        config.short_side,
        config.first_diffusion_steps,
        config.second_diffusion_steps
    );
    let mut all = Vec::new();
    for run in 0..runs {
        let start = Instant::now();
        let result = infer_template(&template, "astronaut", &users, &mut c, &config, 1, &Silent, &CancelToken::new())?;
        let wall = start.elapsed();
        print_times(&format!("run {run}"), &result.times, wall.as_secs_f64());
        all.push((result.times, wall.as_secs_f64()));
    }
    all.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (median, wall) = all[all.len() / 2];
    print_times("median", &median, wall);
    Ok(())
}

fn print_times(label: &str, t: &StageTimes, wall: f64) {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "{label:>7}: wall {:8.1} ms | face {:7.1} | preprocessors {:7.1} | diffusion {:8.1} | post {:6.1} ms",
        wall * 1e3,
        ms(t.face),
        ms(t.preprocess),
        ms(t.diffusion),
        ms(t.post)
    );
}

/// A diffusers folder of the diffusion crate's tiny fixtures.
fn tiny_base(fixtures: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let base = dir.join("tiny-sd15");
    for (from, to) in [
        ("sd15/config.json", "unet/config.json"),
        ("sd15/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
        ("vae/config.json", "vae/config.json"),
        ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
        ("clip_l/config.json", "text_encoder/config.json"),
        ("clip_l/model.safetensors", "text_encoder/model.safetensors"),
    ] {
        std::fs::create_dir_all(base.join(to).parent().unwrap_or(&base))?;
        std::fs::copy(fixtures.join(from), base.join(to))?;
    }
    std::fs::create_dir_all(base.join("tokenizer"))?;
    for entry in std::fs::read_dir(fixtures.join("tokenizer/folder_vocab_merges"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), base.join("tokenizer").join(entry.file_name()))?;
    }
    Ok(base)
}

/// A rank-2 kohya LoRA on the tiny UNet's and text encoder's query projections.
fn write_lora(c: &mut Components, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut tensors = std::collections::HashMap::new();
    let mut failure = None;
    let mut add = |prefix: KohyaPrefix, layer: LayerMut<'_>| {
        let LayerMut::Linear(l) = layer else { return };
        let path = l.path().to_string();
        if !(path.ends_with("to_q") || path.ends_with("q_proj")) {
            return;
        }
        let result = (|| -> candle_core::Result<()> {
            let (out, inp) = l.weight().dims2()?;
            let name = kohya_name(prefix, &path);
            let values = |n: usize| (0..n).map(|i| (i as f32 * 0.37).sin() * 0.3).collect::<Vec<_>>();
            tensors
                .insert(format!("{name}.lora_down.weight"), Tensor::from_vec(values(2 * inp), (2, inp), &Device::Cpu)?);
            tensors
                .insert(format!("{name}.lora_up.weight"), Tensor::from_vec(values(2 * out), (out, 2), &Device::Cpu)?);
            tensors.insert(format!("{name}.alpha"), Tensor::new(2f32, &Device::Cpu)?);
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
