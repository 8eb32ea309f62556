//! The creative (SDXL txt2img) path end to end on tiny random SDXL components with real layouts
//! (the lora crate's SDXL UNet and text encoders with their kohya LoRA, the diffusion crate's
//! VAE and tokenizer, assembled as a diffusers folder), through the library and the CLI. Needs
//! ORT_DYLIB_PATH (the face models).

mod support;

use std::path::Path;
use support::{diffusion_fixture, face_asset, lora_fixture, pipeline_folder, temp_dir, tiny_sdxl};

use candle_core::{DType, Device};
use clap::Parser;
use easyphoto_diffusion::{Txt2Img, VisitLayers};
use easyphoto_face::{FaceRes, Mtcnn};
use easyphoto_lora::{BaseFamily, LoraError, Targets, load_lora, merge};
use easyphoto_pipeline::cli::{Cli, run};
use easyphoto_pipeline::creative::{CreativeComponents, CreativeConfig, create, load_sdxl};
use easyphoto_pipeline::train::face_id_score::{face_embedding, identity_score};
use easyphoto_pipeline::{CancelToken, Manifest, PipelineError, Progress, Silent, UserId, UserStore, write_atomic};
use image::RgbImage;

fn components(model: &Path) -> CreativeComponents {
    CreativeComponents {
        sd: load_sdxl(model, DType::F32, &Device::Cpu).unwrap(),
        detector: Box::new(Mtcnn::new(1).unwrap()),
        embedder: Box::new(FaceRes::load(face_asset("human_faceres.onnx"), 1).unwrap()),
    }
}

fn config() -> CreativeConfig {
    CreativeConfig {
        text_to_image_width: 64,
        text_to_image_height: 48,
        diffusion_steps: 4,
        seed: 11,
        text_to_image_input_prompt: "a portrait in a garden".into(),
        ..CreativeConfig::default()
    }
}

/// A user with the astronaut as reference photo and `lora` as final LoRA.
fn user(store: &UserStore, name: &str, lora: &Path) -> UserId {
    let id = UserId::new(name).unwrap();
    let photo = easyphoto_face::load_rgb(face_asset("astronaut.png")).unwrap();
    let mut jpeg = Vec::new();
    photo.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    write_atomic(&store.reference_image(&id), &jpeg).unwrap();
    write_atomic(&store.lora_path(&id), &std::fs::read(lora).unwrap()).unwrap();
    id
}

fn to_rgb(image: &candle_core::Tensor) -> RgbImage {
    let (_, _, h, w) = image.dims4().unwrap();
    let v: Vec<u8> = (image.squeeze(0).unwrap().permute((1, 2, 0)).unwrap() * 255.0)
        .unwrap()
        .round()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|x| x.clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, v).unwrap()
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn sdxl_creative_writes_a_reproducible_image_with_the_users_lora_and_its_score() {
    let dir = temp_dir("pipeline_creative", "e2e");
    let model = tiny_sdxl(&dir);
    let store = UserStore::new(dir.join("root"));
    let id = user(&store, "画家", &lora_fixture("sdxl_kohya.safetensors"));
    let out_dir = dir.join("out");
    let mut comps = components(&model);
    let steps = std::sync::Mutex::new(vec![]);
    let observer = |e: Progress<'_>| steps.lock().unwrap().push((e.stage.to_string(), e.step, e.total));
    let created = create(&store, &id, None, &mut comps, &config(), &out_dir, &observer, &CancelToken::new()).unwrap();

    // The image and its record at the documented place.
    assert_eq!(created.len(), 1);
    let c = &created[0];
    assert_eq!(c.image, out_dir.join("画家-11.png"));
    let written = easyphoto_face::load_rgb(&c.image).unwrap();
    assert_eq!(written.dimensions(), (64, 48));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("画家-11.json")).unwrap()).unwrap();
    assert_eq!(record["seed"], 11);
    assert_eq!(
        c.prompt,
        format!(
            "a portrait in a garden, look at viewer, easyphoto_face, easyphoto, 1person, <lora:画家:1>, {}",
            easyphoto_pipeline::creative::DEFAULT_POSITIVE_XL
        )
    );
    assert_eq!(record["prompt"], c.prompt.as_str());
    assert_eq!(*steps.lock().unwrap(), (1..=4).map(|s| ("creative".to_string(), s, Some(4))).collect::<Vec<_>>());

    // The display score is the identity score of the result's face against the reference's
    // (`null` in the record when the tiny random model paints no face, as here).
    let reference = easyphoto_face::load_rgb(store.reference_image(&id)).unwrap();
    let reference = face_embedding(&reference, comps.detector.as_ref(), comps.embedder.as_ref()).unwrap();
    assert!(reference.is_some(), "the astronaut's face is found");
    let expected = face_embedding(&written, comps.detector.as_ref(), comps.embedder.as_ref())
        .unwrap()
        .and_then(|face| identity_score(&face, &[reference.clone().unwrap()]));
    println!("display score {:?}", c.score);
    assert_eq!(c.score, expected);
    assert_eq!(record["score"], serde_json::to_value(expected).unwrap());

    // The same seed gives the same file.
    let first = std::fs::read(&c.image).unwrap();
    let again = create(&store, &id, None, &mut comps, &config(), &out_dir, &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(&again[0].image).unwrap(), first);

    // The LoRA was detached afterwards, and it changed the image: without it the same request
    // gives another image; with it merged into the weights (the lora crate's merge into UNet and
    // both encoders) the same image up to rounding.
    let request = Txt2Img {
        prompt: c.prompt.clone(),
        negative_prompt: c.negative_prompt.clone(),
        width: 64,
        height: 48,
        steps: 4,
        guidance_scale: 7.0,
        sampler: "DPM++ 2M".parse().unwrap(),
        seed: 11,
    };
    let plain = to_rgb(&comps.sd.txt2img(&request, &mut |_| easyphoto_diffusion::sampling::Flow::Continue).unwrap().0);
    let without = max_diff(&plain, &written);
    let mut merged = load_sdxl(&model, DType::F32, &Device::Cpu).unwrap();
    {
        let lora = load_lora(lora_fixture("sdxl_kohya.safetensors"), &Device::Cpu).unwrap();
        let mut encoders = merged.text_encoders.encoders_mut();
        let (te1, te2) = (encoders.next().unwrap(), encoders.next().unwrap());
        let mut targets = Targets {
            unet: Some(&mut merged.unet),
            text_encoder: Some(te1 as &mut dyn VisitLayers),
            text_encoder_2: Some(te2 as &mut dyn VisitLayers),
        };
        let (_, reports) = merge(&mut targets, &[(&lora, 1.0)]).unwrap();
        assert!(reports.iter().all(|r| r.unmatched.is_empty()) && reports[0].applied > 0);
    }
    let with = to_rgb(&merged.txt2img(&request, &mut |_| easyphoto_diffusion::sampling::Flow::Continue).unwrap().0);
    let merged_diff = max_diff(&with, &written);
    println!("max |Δ| per channel: without the LoRA {without}, LoRA merged vs attached {merged_diff}");
    assert!(without >= 8, "the LoRA changes the image ({without})");
    assert!(merged_diff <= 1, "attached = merged ({merged_diff})");

    // A batch with a random seed: two images with their own seeds, each at its documented path.
    let batch = CreativeConfig { seed: -1, batch_size: 2, ..config() };
    let two = create(&store, &id, None, &mut comps, &batch, &out_dir, &Silent, &CancelToken::new()).unwrap();
    for c in &two {
        assert!(c.seed < 65536 && c.image == out_dir.join(format!("画家-{}.png", c.seed)) && c.image.is_file());
    }
}

/// `file` without its safetensors metadata (so only its key names tell its family).
fn without_metadata(file: &Path, to: &Path) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.remove("__metadata__");
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(to, out).unwrap();
}

#[test]
fn sd15_loras_and_models_are_refused_with_typed_errors() {
    let dir = temp_dir("pipeline_creative", "bad");
    let model = tiny_sdxl(&dir);
    let store = UserStore::new(dir.join("root"));
    let out_dir = dir.join("out");
    let mut comps = components(&model);
    let bare = dir.join("sd15_bare.safetensors");
    without_metadata(&lora_fixture("sd15_kohya_a.safetensors"), &bare);
    for (name, lora, evidence) in [
        ("sd15", lora_fixture("sd15_kohya_a.safetensors"), "ss_base_model_version is `sd_v1`"),
        ("sd15-bare", bare, "single text encoder"),
    ] {
        let id = user(&store, name, &lora);
        match create(&store, &id, None, &mut comps, &config(), &out_dir, &Silent, &CancelToken::new()) {
            Err(PipelineError::Lora(e)) => match *e {
                LoraError::WrongBase {
                    ref file,
                    lora: BaseFamily::Sd1,
                    model: BaseFamily::Sdxl,
                    evidence: ref got,
                } => {
                    assert!(file.ends_with(".safetensors") && got.contains(evidence), "{e}");
                }
                other => panic!("{name}: {other:?}"),
            },
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(!out_dir.exists(), "nothing written");

    // An unknown user, and a missing LoRA file given by name.
    let ghost = UserId::new("ghost").unwrap();
    match create(&store, &ghost, None, &mut comps, &config(), &out_dir, &Silent, &CancelToken::new()) {
        Err(PipelineError::UserNotReady { missing, .. }) => assert_eq!(missing, store.reference_image(&ghost)),
        other => panic!("{other:?}"),
    }
    let id = UserId::new("sd15").unwrap();
    let nowhere = dir.join("nowhere.safetensors");
    match create(&store, &id, Some(&nowhere), &mut comps, &config(), &out_dir, &Silent, &CancelToken::new()) {
        Err(PipelineError::UserNotReady { missing, .. }) => assert_eq!(missing, nowhere),
        other => panic!("{other:?}"),
    }
    for (field, set) in
        [("text_to_image_width", "text_to_image_width = 0"), ("sampler_name", "sampler_name = \"Heun++\"")]
    {
        let bad: CreativeConfig = toml::from_str(set).unwrap();
        match create(&store, &id, None, &mut comps, &bad, &out_dir, &Silent, &CancelToken::new()) {
            Err(PipelineError::InvalidParameter { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{other:?}"),
        }
    }
    // Width and height must fit the model's latent grid (a multiple of 4 here).
    let odd = CreativeConfig { text_to_image_width: 62, ..config() };
    let sdxl_user = user(&store, "xl", &lora_fixture("sdxl_kohya.safetensors"));
    let err = create(&store, &sdxl_user, None, &mut comps, &odd, &out_dir, &Silent, &CancelToken::new()).unwrap_err();
    assert!(matches!(err, PipelineError::Diffusion(_)) && err.to_string().contains("width"), "{err:?}");

    // An SD1.5 model is not an SDXL one.
    let sd15 = pipeline_folder(
        &dir.join("tiny-sd15"),
        &[
            ("unet", diffusion_fixture("sd15")),
            ("vae", diffusion_fixture("vae")),
            ("text_encoder", diffusion_fixture("clip_l")),
            ("tokenizer", diffusion_fixture("tokenizer/folder_vocab_merges")),
        ],
    );
    match load_sdxl(&sd15, DType::F32, &Device::Cpu) {
        Err(PipelineError::InvalidInput { path, reason }) => {
            assert!(path == sd15 && reason.contains("Sd1"), "{reason}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Or given directly as the creative model.
    comps.sd = easyphoto_diffusion::StableDiffusion::load(&sd15, 1, DType::F32, &Device::Cpu).unwrap();
    match create(&store, &sdxl_user, None, &mut comps, &config(), &out_dir, &Silent, &CancelToken::new()) {
        Err(PipelineError::InvalidParameter { field, reason }) => {
            assert!(field == "sd_model_checkpoint" && reason.contains("Sd1"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_creative_command_writes_and_prints_its_results() {
    let dir = temp_dir("pipeline_creative", "cli");
    let model = tiny_sdxl(&dir);
    let store = UserStore::new(dir.join("root"));
    let id = user(&store, "anna", &lora_fixture("sdxl_kohya.safetensors"));
    let models = dir.join("models");
    let manifest = Manifest::embedded().unwrap();
    // Random-weight SCRFD and ArcFace with the real layouts, at the manifest's places.
    for (name, asset) in [("scrfd-10g", "scrfd_random.onnx"), ("arcface-r50", "arcface_random.onnx")] {
        write_atomic(&manifest.get(name).unwrap().local_path(&models), &std::fs::read(face_asset(asset)).unwrap())
            .unwrap();
    }
    let out_dir = dir.join("out");
    let args = |extra: &[String]| {
        let mut argv: Vec<String> = ["easyphoto", "--root", dir.join("root").to_str().unwrap(), "--models-dir"]
            .into_iter()
            .map(String::from)
            .collect();
        argv.extend([models.to_str().unwrap().into(), "creative".into(), "--output".into()]);
        argv.push(out_dir.to_str().unwrap().into());
        argv.extend(extra.iter().cloned());
        Cli::try_parse_from(argv).unwrap()
    };
    let sets = [
        format!("sd_model_checkpoint={}", model.display()),
        "text_to_image_width=32".into(),
        "text_to_image_height=32".into(),
        "diffusion_steps=2".into(),
        "seed=5".into(),
    ];
    let mut argv = vec!["--user-id".to_string(), id.to_string()];
    for s in &sets {
        argv.extend(["--set".to_string(), s.clone()]);
    }
    let mut out = Vec::new();
    run(&args(&argv), &mut out, &Silent, &CancelToken::new()).unwrap();
    let out = String::from_utf8(out).unwrap();
    let image = out_dir.join("anna-5.png");
    assert!(out.starts_with(&format!("anna: {} (seed 5; anna: ", image.display())), "{out}");
    assert_eq!(easyphoto_face::load_rgb(&image).unwrap().dimensions(), (32, 32));

    // An SD1.5 LoRA named on the command line: the typed error, nothing written.
    let before = std::fs::read_dir(&out_dir).unwrap().count();
    argv.extend(["--lora".to_string(), lora_fixture("sd15_kohya_a.safetensors").display().to_string()]);
    argv.extend(["--set".to_string(), "seed=6".into()]);
    let err = run(&args(&argv), &mut Vec::new(), &Silent, &CancelToken::new()).unwrap_err();
    assert!(matches!(&err, PipelineError::Lora(e) if matches!(**e, LoraError::WrongBase { .. })), "{err:?}");
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), before);
    // A user without files is refused before any model loads.
    let err =
        run(&args(&["--user-id".into(), "nobody".into()]), &mut Vec::new(), &Silent, &CancelToken::new()).unwrap_err();
    assert!(matches!(err, PipelineError::UserNotReady { .. }), "{err:?}");
}
