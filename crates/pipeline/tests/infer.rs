//! The infer flow end to end on the tiny random SD1.5 / ControlNet components of the diffusion and
//! controlnet crates, with the real face models (built-in MTCNN, Human's faceres) and real photos
//! of the face crate. Needs ONNX Runtime (`ORT_DYLIB_PATH`, see tools/test.sh).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use easyphoto_diffusion::{LayerMut, VisitLayers};
use easyphoto_face::{geometry::expand_box, load_rgb};
use easyphoto_lora::{KohyaPrefix, kohya_name};
use easyphoto_pipeline::components::{ComponentPaths, Components, EmbedderPath, PoseModelPath};
use easyphoto_pipeline::infer::{UserAssets, face_masks, infer_template, run_job};
use easyphoto_pipeline::{
    CancelToken, InferConfig, InferJob, Manifest, PipelineError, Progress, Silent, UserId, UserStore,
};
use image::{GrayImage, RgbImage};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn face_asset(name: &str) -> PathBuf {
    crate_dir().join("../face/tests/assets").join(name)
}

/// A diffusers pipeline folder of the tiny components (UNet, VAE, CLIP, tokenizer of the
/// diffusion crate's fixtures), built once.
fn tiny_base() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let fixtures = crate_dir().join("../diffusion/tests/fixtures");
        let dir = std::env::temp_dir().join(format!("easyphoto-infer-tiny-{}", std::process::id()));
        for (from, to) in [
            ("sd15/config.json", "unet/config.json"),
            ("sd15/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
            ("vae/config.json", "vae/config.json"),
            ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
            ("clip_l/config.json", "text_encoder/config.json"),
            ("clip_l/model.safetensors", "text_encoder/model.safetensors"),
        ] {
            std::fs::create_dir_all(dir.join(to).parent().unwrap()).unwrap();
            std::fs::copy(fixtures.join(from), dir.join(to)).unwrap();
        }
        let tokenizer = fixtures.join("tokenizer/folder_vocab_merges");
        std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
        for entry in std::fs::read_dir(&tokenizer).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join("tokenizer").join(entry.file_name())).unwrap();
        }
        dir
    })
}

fn paths() -> ComponentPaths {
    let controlnet = crate_dir().join("../controlnet/tests/fixtures/sd15_controlnet");
    ComponentPaths {
        base: tiny_base().to_path_buf(),
        vae: None,
        canny: controlnet.clone(),
        openpose: controlnet.clone(),
        color: controlnet.clone(),
        tile: controlnet,
        pose: PoseModelPath::MoveNet(crate_dir().join("../controlnet/assets/human_movenet-lightning.onnx")),
        detector: None,
        embedder: EmbedderPath::FaceRes(face_asset("human_faceres.onnx")),
        style_lora: None,
    }
}

/// The components, loaded once and shared (the flow attaches and detaches LoRAs, so one test at
/// a time uses them).
fn components() -> std::sync::MutexGuard<'static, Components> {
    static C: OnceLock<Mutex<Components>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(Components::load(&paths(), DType::F32, &Device::Cpu, 1).unwrap()))
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fewer steps than EasyPhoto's 50 / 20 keep the tests short; the flow is the same.
fn config() -> InferConfig {
    InferConfig {
        short_side: 64,
        first_diffusion_steps: 10,
        second_diffusion_steps: 10,
        seed: 7,
        ..InferConfig::default()
    }
}

/// A kohya LoRA (rank 2, seeded values) for the tiny UNet's and text encoder's attention
/// projections, so that attaching it changes the outputs.
fn write_tiny_lora(components: &mut Components, path: &Path) {
    let mut tensors = std::collections::HashMap::new();
    let mut add = |prefix: KohyaPrefix, layer: LayerMut<'_>| {
        let LayerMut::Linear(l) = layer else { return };
        let path = l.path().to_string();
        if !(path.ends_with("to_q") || path.ends_with("q_proj")) {
            return;
        }
        let (out, inp) = l.weight().dims2().unwrap();
        let name = kohya_name(prefix, &path);
        let seed = tensors.len() as f32;
        let values = |n: usize, k: f32| (0..n).map(|i| ((i as f32 * 0.37 + seed + k).sin()) * 0.3).collect::<Vec<_>>();
        tensors.insert(
            format!("{name}.lora_down.weight"),
            Tensor::from_vec(values(2 * inp, 1.0), (2, inp), &Device::Cpu).unwrap(),
        );
        tensors.insert(
            format!("{name}.lora_up.weight"),
            Tensor::from_vec(values(out * 2, 2.0), (out, 2), &Device::Cpu).unwrap(),
        );
        tensors.insert(format!("{name}.alpha"), Tensor::new(2f32, &Device::Cpu).unwrap());
    };
    components.sd.unet.visit_layers(&mut |layer| add(KohyaPrefix::Unet, layer));
    if let Some(te) = components.sd.text_encoders.encoders_mut().next() {
        te.visit_layers(&mut |layer| add(KohyaPrefix::TextEncoder, layer));
    }
    assert!(!tensors.is_empty());
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// A trained user `id` under `root`: reference photo (a real face) and LoRA.
fn make_user(root: &Path, id: &str, components: &mut Components) -> (UserStore, UserId) {
    let store = UserStore::new(root);
    let id = UserId::new(id).unwrap();
    let reference = store.reference_image(&id);
    std::fs::create_dir_all(reference.parent().unwrap()).unwrap();
    let photo = load_rgb(face_asset("faceapi_sample2_640.png")).unwrap();
    photo.save(&reference).unwrap();
    let lora = store.lora_path(&id);
    std::fs::create_dir_all(lora.parent().unwrap()).unwrap();
    write_tiny_lora(components, &lora);
    (store, id)
}

/// Every file under `dir`, relative.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The bounding box of the pixels where `a` and `b` differ.
fn changed_box(a: &RgbImage, b: &RgbImage) -> Option<[u32; 4]> {
    let mut bx: Option<[u32; 4]> = None;
    for (x, y, p) in a.enumerate_pixels() {
        if *p != b[(x, y)] {
            bx = Some(match bx {
                None => [x, y, x + 1, y + 1],
                Some([x1, y1, x2, y2]) => [x1.min(x), y1.min(y), x2.max(x + 1), y2.max(y + 1)],
            });
        }
    }
    bx
}

fn inside(inner: [u32; 4], outer: [i32; 4]) -> bool {
    inner[0] as i32 >= outer[0]
        && inner[1] as i32 >= outer[1]
        && inner[2] as i32 <= outer[2]
        && inner[3] as i32 <= outer[3]
}

#[test]
fn single_template_end_to_end_writes_a_scored_result_and_changes_only_the_face_crop() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = components();
    let (store, id) = make_user(tmp.path(), "alice", &mut c);
    let template_path = face_asset("astronaut.png");
    let output = tmp.path().join("outputs");
    // `InferJob::check` would ask for the manifest's real files; the tiny components stand in here.
    let job = InferJob {
        user_ids: vec![Some(id.clone())],
        templates: vec![template_path.clone()],
        output_dir: output.clone(),
        config: config(),
    };
    let events = Mutex::new(Vec::new());
    let observer = |e: Progress<'_>| events.lock().unwrap().push((e.message.to_string(), e.step, e.total));
    let report = run_job(&job, &store, &mut c, &observer, &CancelToken::new()).unwrap();

    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.written.len(), 1);
    let written = &report.written[0];
    assert_eq!(written.image, output.join("astronaut.png"));
    let result = image::open(&written.image).unwrap().to_rgb8();
    let template = load_rgb(&template_path).unwrap();
    assert_eq!(result.dimensions(), template.dimensions());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("astronaut.json")).unwrap()).unwrap();
    assert_eq!(json["seed"], 7);

    // One face, scored against the user's reference; only its crop changed.
    assert_eq!(written.faces.len(), 1);
    let face = &written.faces[0];
    assert_eq!(face.user_id, "alice");
    let score = face.score;
    assert!((-1.0..=1.0).contains(&score), "display score {score}");
    println!("display score {score}");
    let changed = changed_box(&result, &template).expect("the face was repainted");
    assert!(inside(changed, face.crop_box), "changed {changed:?} outside the crop {:?}", face.crop_box);
    let outside_same = result.enumerate_pixels().filter(|(x, y, _)| {
        let (x, y) = (*x as i32, *y as i32);
        let b = face.crop_box;
        !(x >= b[0] && x < b[2] && y >= b[1] && y < b[3])
    });
    assert!(outside_same.clone().count() > 0);
    assert!(outside_same.into_iter().all(|(x, y, p)| *p == template[(x, y)]));

    // Progress reached every step of the flow and both diffusions.
    let events = events.into_inner().unwrap();
    for message in ["crop face", "first diffusion", "second diffusion", "paste back"] {
        assert!(events.iter().any(|(m, _, _)| m == message), "no progress for {message}");
    }
    // 10 steps × 0.45 = 4 sampler steps, 10 × 0.30 = 3.
    assert!(events.iter().any(|(m, s, t)| m == "first diffusion" && *s == 4 && *t == Some(4)));
    assert!(events.iter().any(|(m, s, t)| m == "second diffusion" && *s == 3 && *t == Some(3)));

    // Nothing written outside the output folder and the user's files.
    let all = files_under(tmp.path());
    assert!(all.iter().all(|p| p.starts_with(&output) || p.starts_with(store.user_dir(&id))), "{all:?}");
}

#[test]
fn masks_cover_the_template_face_and_not_its_background() {
    let c = components();
    let template = load_rgb(face_asset("astronaut.png")).unwrap();
    let face = c.detector.detect_some(&template, "astronaut").unwrap()[0];
    let (w, h) = template.dimensions();
    let b = expand_box(face.bbox.map(f64::from), 1.1, w, h);
    let masks = face_masks((w, h), &face, (b[2] - b[0]) as u32).unwrap();
    let on = |m: &GrayImage, [x, y]: [f32; 2]| m[(x as u32, y as u32)][0] == 255;
    for (name, m) in [("face", &masks.face), ("first", &masks.first)] {
        for p in face.landmarks {
            assert!(on(m, p), "{name} mask misses landmark {p:?}");
        }
        // The corners of the image (background) stay out.
        for p in [[0.0, 0.0], [w as f32 - 1.0, 0.0], [0.0, h as f32 - 1.0], [w as f32 - 1.0, h as f32 - 1.0]] {
            assert!(!on(m, p), "{name} mask covers the background at {p:?}");
        }
        let covered = m.pixels().filter(|p| p[0] == 255).count() as f64 / f64::from(w * h);
        assert!(covered > 0.01 && covered < 0.3, "{name} mask covers {covered}");
    }
    // The first mask grows the face mask; the second is a ring plus eyes and lips: the eyes are in,
    // the nose tip (inside the ring, not an eye or lip) is out.
    assert!(masks.face.pixels().zip(masks.first.pixels()).all(|(f, g)| f[0] <= g[0]));
    assert!(on(&masks.second, face.landmarks[0]) && on(&masks.second, face.landmarks[1]));
    assert!(!on(&masks.second, face.landmarks[2]));
}

#[test]
fn multi_person_template_changes_only_the_selected_faces() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = components();
    let (store, id) = make_user(tmp.path(), "carol", &mut c);
    let template = load_rgb(face_asset("faceapi_sample1_640.png")).unwrap();
    let (w, h) = template.dimensions();
    let mut faces = c.detector.detect(&template).unwrap();
    assert!(faces.len() >= 2, "the group photo has {} faces", faces.len());
    faces.sort_by(|a, b| a.bbox[0].total_cmp(&b.bbox[0]));
    let user = UserAssets::load(&store, &id, &c).unwrap();
    // Skip the left-most face, process the second.
    let users = [None, Some(user)];
    let result =
        infer_template(&template, "group", &users, &mut c, &config(), 3, &Silent, &CancelToken::new()).unwrap();
    assert_eq!(result.faces.len(), 1);
    assert_eq!(result.faces[0].face, 1);
    let crop_box = result.faces[0].crop_box;
    assert_eq!(crop_box, expand_box(faces[1].bbox.map(f64::from), 3.0, w, h));
    let changed = changed_box(&result.image, &template).expect("the second face was repainted");
    assert!(inside(changed, crop_box), "changed {changed:?} outside the second face's crop {crop_box:?}");
    // The skipped face's own box is untouched.
    let skipped = expand_box(faces[0].bbox.map(f64::from), 1.0, w, h);
    for y in skipped[1]..skipped[3] {
        for x in skipped[0]..skipped[2] {
            let inside_selected = x >= crop_box[0] && x < crop_box[2] && y >= crop_box[1] && y < crop_box[3];
            if !inside_selected {
                assert_eq!(result.image[(x as u32, y as u32)], template[(x as u32, y as u32)]);
            }
        }
    }
}

#[test]
fn a_folder_of_templates_gives_a_folder_of_results_and_skips_a_template_without_a_face() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = components();
    let (store, id) = make_user(tmp.path(), "gina", &mut c);
    let templates = tmp.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::copy(face_asset("astronaut.png"), templates.join("a.png")).unwrap();
    RgbImage::from_fn(96, 64, |x, y| [(x * 2) as u8, (y * 3) as u8, 90].into()).save(templates.join("b.png")).unwrap();
    let output = tmp.path().join("outputs");
    let job = InferJob {
        user_ids: vec![Some(id)],
        templates: easyphoto_pipeline::jobs::images_in(&templates).unwrap(),
        output_dir: output.clone(),
        config: config(),
    };
    let report = run_job(&job, &store, &mut c, &Silent, &CancelToken::new()).unwrap();
    assert_eq!(report.written.len(), 1);
    assert_eq!(report.written[0].image, output.join("a.png"));
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, templates.join("b.png"));
    assert!(matches!(report.failed[0].1, PipelineError::NoTemplateFace { .. }), "{:?}", report.failed[0].1);
    assert_eq!(files_under(&output), vec![output.join("a.json"), output.join("a.png")]);
    assert_eq!(image::open(output.join("a.png")).unwrap().to_rgb8().dimensions(), (512, 512));
}

#[test]
fn a_template_without_a_face_is_a_typed_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = components();
    let (store, id) = make_user(tmp.path(), "dave", &mut c);
    let blank = tmp.path().join("blank.png");
    RgbImage::from_fn(96, 64, |x, y| [(x * 2) as u8, (y * 3) as u8, 90].into()).save(&blank).unwrap();
    let output = tmp.path().join("outputs");
    let job = InferJob {
        user_ids: vec![Some(id)],
        templates: vec![blank.clone()],
        output_dir: output.clone(),
        config: config(),
    };
    match run_job(&job, &store, &mut c, &Silent, &CancelToken::new()) {
        Err(PipelineError::NoTemplateFace { template }) => assert!(template.ends_with("blank.png"), "{template}"),
        other => panic!("expected NoTemplateFace, got {other:?}"),
    }
    assert!(!output.exists());
}

#[test]
fn an_unknown_user_and_a_corrupt_lora_are_typed_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = components();
    let (store, id) = make_user(tmp.path(), "erin", &mut c);
    let output = tmp.path().join("outputs");
    let template = face_asset("astronaut.png");
    let job = |ids| InferJob {
        user_ids: ids,
        templates: vec![template.clone()],
        output_dir: output.clone(),
        config: config(),
    };

    let unknown = UserId::new("nobody").unwrap();
    match run_job(&job(vec![Some(unknown)]), &store, &mut c, &Silent, &CancelToken::new()) {
        Err(PipelineError::UserNotReady { id, .. }) => assert_eq!(id, "nobody"),
        other => panic!("expected UserNotReady, got {other:?}"),
    }

    std::fs::write(store.lora_path(&id), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    match run_job(&job(vec![Some(id.clone())]), &store, &mut c, &Silent, &CancelToken::new()) {
        Err(PipelineError::Lora(e)) => {
            assert!(e.to_string().contains(&*store.lora_path(&id).display().to_string()), "{e}")
        }
        other => panic!("expected a LoRA error, got {other:?}"),
    }
    assert!(!output.exists());
}

#[test]
fn one_seed_gives_identical_images_and_cancelling_is_a_typed_error_that_leaves_no_lora_attached() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = components();
    let (store, id) = make_user(tmp.path(), "bob", &mut c);
    let users = [Some(UserAssets::load(&store, &id, &c).unwrap())];
    let template = load_rgb(face_asset("astronaut.png")).unwrap();
    let run = |c: &mut Components, seed| {
        infer_template(&template, "astronaut", &users, c, &config(), seed, &Silent, &CancelToken::new()).unwrap()
    };
    let first = run(&mut c, 11);

    let cancel = CancelToken::new();
    let observer = |e: Progress<'_>| {
        if e.message == "first diffusion" && e.step == 2 {
            cancel.cancel();
        }
    };
    match infer_template(&template, "astronaut", &users, &mut c, &config(), 11, &observer, &cancel) {
        Err(PipelineError::Cancelled { stage }) => assert_eq!(stage, "first diffusion"),
        other => panic!("expected Cancelled, got {:?}", other.map(|r| r.seed)),
    }

    // Same seed, same image (and the cancelled run left no LoRA attached); another seed differs.
    let again = run(&mut c, 11);
    assert_eq!(first.image, again.image);
    assert_eq!(first.faces, again.faces);
    assert_ne!(first.image, run(&mut c, 12).image, "another seed should give another image");
}

#[test]
fn a_missing_model_file_in_offline_mode_is_a_typed_error_listing_it() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = Manifest::embedded().unwrap();
    let models = tmp.path().join("models");
    match ComponentPaths::from_models_dir(&manifest, &models, &InferConfig::default(), "https://huggingface.co") {
        Err(PipelineError::ModelsMissing { models_dir, missing }) => {
            assert_eq!(models_dir, models);
            assert!(missing.iter().any(|m| m.name == "controlnet-canny"));
            assert!(missing.iter().all(|m| m.path.starts_with(&models)));
        }
        other => panic!("expected ModelsMissing, got {other:?}"),
    }
    assert!(files_under(tmp.path()).is_empty());
}
