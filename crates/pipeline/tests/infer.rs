//! The infer flow end to end on the tiny random SD1.5 / ControlNet components of the diffusion and
//! controlnet crates, with the real face models (built-in MTCNN, Human's faceres) and real photos
//! of the face crate. Needs ONNX Runtime (`ORT_DYLIB_PATH`, see tools/test.sh).

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use support::{crate_dir, face_asset};

use candle_core::{DType, Device, Tensor};
use easyphoto_diffusion::{LayerMut, VisitLayers};
use easyphoto_face::{geometry::expand_box, load_rgb};
use easyphoto_lora::{KohyaPrefix, kohya_name};
use easyphoto_pipeline::components::{ComponentPaths, Components, EmbedderPath, PoseModelPath};
use easyphoto_pipeline::infer::{FaceParts, UserAssets, infer_template, run_job};
use easyphoto_pipeline::{
    CancelToken, InferConfig, InferJob, Manifest, PipelineError, Progress, Silent, UserId, UserStore,
};
use image::{GrayImage, RgbImage};

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
        seam_diffusion_steps: 10,
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
    // One person: no seam pass.
    assert!(!events.iter().any(|(m, _, _)| m == "seam diffusion"));

    // Nothing written outside the output folder and the user's files.
    let all = files_under(tmp.path());
    assert!(all.iter().all(|p| p.starts_with(&output) || p.starts_with(store.user_dir(&id))), "{all:?}");
}

#[test]
fn masks_cover_the_template_face_and_not_its_background() {
    let c = components();
    for name in ["astronaut.png", "faceapi_sample3_640.png"] {
        let template = load_rgb(face_asset(name)).unwrap();
        let face = c.detector.detect_some(&template, name).unwrap()[0];
        let (w, h) = template.dimensions();
        let input_box = expand_box(face.bbox.map(f64::from), 1.1, w, h);
        let parts = FaceParts::parse(c.parser.as_ref(), &template, &face).unwrap();
        let first = parts.first_mask((input_box[2] - input_box[0]) as u32);
        let second = parts.second_mask().unwrap();
        let on = |m: &GrayImage, [x, y]: [f32; 2]| m[(x as u32, y as u32)][0] == 255;
        let count = |m: &GrayImage, inside: [i32; 4]| {
            m.enumerate_pixels()
                .filter(|(x, y, p)| {
                    let (x, y) = (*x as i32, *y as i32);
                    p[0] == 255 && x >= inside[0] && x < inside[2] && y >= inside[1] && y < inside[3]
                })
                .count()
        };
        let detection = expand_box(face.bbox.map(f64::from), 1.0, w, h);
        let det_area = ((detection[2] - detection[0]) * (detection[3] - detection[1])) as usize;
        let whole = [0, 0, w as i32, h as i32];
        // The face region: every landmark in, at least half of the detection box covered, and
        // nothing outside the face box × 1.5 (the background stays out).
        for p in face.landmarks {
            assert!(on(&parts.face, p), "{name}: the face mask misses landmark {p:?}");
        }
        let covered = count(&parts.face, detection);
        assert!(covered * 2 > det_area, "{name}: the face mask covers {covered} of the {det_area} box pixels");
        let around = expand_box(face.bbox.map(f64::from), 1.5, w, h);
        assert_eq!(count(&parts.face, whole), count(&parts.face, around), "{name}: face mask outside the face");
        // The first mask grows the face region by a tenth of the face width, no further than × 2.
        assert!(parts.face.pixels().zip(first.pixels()).all(|(f, g)| f[0] <= g[0]));
        let wider = expand_box(face.bbox.map(f64::from), 2.0, w, h);
        assert_eq!(count(&first, whole), count(&first, wider), "{name}: first mask reaches the background");
        // The second mask: a ring around the face plus the eyes and lips; the eyes are in, the nose
        // tip (inside the ring, not an eye or a lip) is out; the eyes-and-lips part is small.
        assert!(on(&second, face.landmarks[0]) && on(&second, face.landmarks[1]), "{name}: eyes");
        assert!(!on(&second, face.landmarks[2]), "{name}: the second mask covers the nose");
        let eyes_lips = count(&parts.eyes_lips, whole);
        assert!(eyes_lips > 0 && eyes_lips * 4 < covered, "{name}: eyes and lips {eyes_lips} of a {covered} face");
        assert_eq!(count(&second, whole), count(&second, wider), "{name}: second mask reaches the background");
    }
}

#[test]
fn multi_person_template_changes_only_the_selected_faces() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = components();
    let (store, id) = make_user(tmp.path(), "carol", &mut c);
    let template = load_rgb(face_asset("faceapi_sample1_640.png")).unwrap();
    let (w, h) = template.dimensions();
    let mut faces = c.detector.detect(&template).unwrap();
    assert_eq!(faces.len(), 3, "the group photo has three faces");
    faces.sort_by(|a, b| a.bbox[0].total_cmp(&b.bbox[0]));
    // The left and right faces repainted, the middle one skipped.
    let users =
        [Some(UserAssets::load(&store, &id, &c).unwrap()), None, Some(UserAssets::load(&store, &id, &c).unwrap())];
    let events = Mutex::new(Vec::new());
    let observer = |e: Progress<'_>| events.lock().unwrap().push((e.message.to_string(), e.step, e.total));
    let result =
        infer_template(&template, "group", &users, &mut c, &config(), 3, &observer, &CancelToken::new()).unwrap();
    assert_eq!(result.faces.iter().map(|f| f.face).collect::<Vec<_>>(), [0, 2]);
    let crops: Vec<[i32; 4]> = result.faces.iter().map(|f| f.crop_box).collect();
    for (crop, k) in crops.iter().zip([0, 2]) {
        assert_eq!(*crop, expand_box(faces[k].bbox.map(f64::from), 3.0, w, h));
        let changed = result.image.enumerate_pixels().filter(|(x, y, p)| {
            let (xi, yi) = (*x as i32, *y as i32);
            xi >= crop[0] && xi < crop[2] && yi >= crop[1] && yi < crop[3] && **p != template[(*x, *y)]
        });
        assert!(changed.count() > 0, "face {k} was not repainted");
    }
    // The seam pass ran (10 steps × 0.3 = 3 sampler steps).
    let events = events.into_inner().unwrap();
    assert!(events.iter().any(|(m, s, t)| m == "seam diffusion" && *s == 3 && *t == Some(3)), "no seam pass");
    // Nothing changed outside the selected faces' crops, and the skipped face's box is untouched
    // wherever it is not inside a selected crop.
    let in_crops = |x: i32, y: i32| crops.iter().any(|b| x >= b[0] && x < b[2] && y >= b[1] && y < b[3]);
    for (x, y, p) in result.image.enumerate_pixels() {
        if !in_crops(x as i32, y as i32) {
            assert_eq!(*p, template[(x, y)], "pixel ({x}, {y}) outside the selected crops changed");
        }
    }
    let skipped = expand_box(faces[1].bbox.map(f64::from), 1.0, w, h);
    let mut checked = 0;
    for y in skipped[1]..skipped[3] {
        for x in skipped[0]..skipped[2] {
            if !in_crops(x, y) {
                assert_eq!(result.image[(x as u32, y as u32)], template[(x as u32, y as u32)]);
                checked += 1;
            }
        }
    }
    let area = ((skipped[2] - skipped[0]) * (skipped[3] - skipped[1])) as usize;
    assert!(checked * 2 > area, "only {checked} of the skipped face's {area} pixels lie outside the selected crops");
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
