//! The train flow end to end on tiny random SD1.5 components (the diffusion crate's fixtures)
//! with the real face models (built-in MTCNN, Human's faceres, the selfie segmenter) on real
//! photos (the face crate's test assets: the astronaut photo, five copies seen differently, and
//! a face of another person from a face-api group photo). Needs ORT_DYLIB_PATH (tools/test.sh).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;
use support::{astronaut, astronaut_photos, diffusion_fixture, face_asset, temp_dir, write_photos};

use candle_core::{DType, Device, Tensor};
use easyphoto_diffusion::{ClipTokenizer, UNetConditioning, diffusers_folder};
use easyphoto_face::geometry::roll_score;
use easyphoto_face::ranking::rank_photos;
use easyphoto_face::{FaceDetector, FaceEmbedder, FaceRes, HumanSelfie, Mtcnn};
use easyphoto_lora::{Targets, load_lora};
use easyphoto_pipeline::train::face_id_score::identity_score;
use easyphoto_pipeline::train::{fuse, preprocess};
use easyphoto_pipeline::{
    BaseModel, CancelToken, Photos, PipelineError, Progress, Silent, TrainComponents, TrainConfig, UserId, UserStore,
    resume_user, train_user,
};
use image::RgbImage;

/// Tiny random SD1.5 parts with the real layouts (UNet 32/64/64, VAE 32/64, CLIP 32-d, 1000 tokens).
fn tiny_base() -> BaseModel {
    let dev = Device::Cpu;
    BaseModel {
        unet: diffusers_folder::load_unet(&diffusion_fixture("sd15"), None, DType::F32, &dev).unwrap(),
        vae: diffusers_folder::load_vae(&diffusion_fixture("vae"), None, DType::F32, &dev).unwrap(),
        text_encoder: diffusers_folder::load_clip_text_model(&diffusion_fixture("clip_l"), None, DType::F32, &dev)
            .unwrap(),
        text_encoder_2: None,
        tokenizer: ClipTokenizer::from_folder(diffusion_fixture("tokenizer/folder_vocab_merges")).unwrap(),
        clip_skip: 1,
        scheduler_config: serde_json::json!({"beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1, "num_train_timesteps": 1000}),
        name: "tiny-sd15".into(),
    }
}

/// The left-most face of `img`, cropped `ratio` box sizes wide.
fn face_crop(img: &RgbImage, ratio: f64) -> RgbImage {
    let faces = Mtcnn::new(1).unwrap().detect(img).unwrap();
    let (_, bx) = preprocess::left_most(&faces, ratio, img.width(), img.height()).unwrap();
    easyphoto_face::geometry::crop(img, bx)
}

/// Another person: the left-most face of a face-api group photo, cropped 3× around it.
fn other_person() -> RgbImage {
    face_crop(&easyphoto_face::load_rgb(face_asset("faceapi_sample1.jpg")).unwrap(), 3.0)
}

/// Validation templates are tight face crops, so that their faces are found at 64 px.
fn components() -> TrainComponents {
    let template_1 = face_crop(&astronaut(), 1.8);
    let template_2 = face_crop(&easyphoto_face::load_rgb(face_asset("faceapi_sample1.jpg")).unwrap(), 1.8);
    TrainComponents {
        base: tiny_base(),
        detector: Box::new(Mtcnn::new(1).unwrap()),
        embedder: Box::new(FaceRes::load(face_asset("human_faceres.onnx"), 1).unwrap()),
        segmenter: Box::new(HumanSelfie::new(1).unwrap()),
        templates: vec![("astronaut".into(), template_1), ("other".into(), template_2)],
    }
}

/// A few steps with two validation rounds (steps 2 and 4) of 4 sampler steps, tiny rank, 32²
/// training crops (validation at 64²).
fn config() -> TrainConfig {
    TrainConfig {
        resolution: 32,
        max_train_steps: 4,
        val_and_checkpointing_steps: 2,
        rank: 4,
        network_alpha: 2,
        learning_rate: 1e-3,
        validation_inference_steps: 4,
        seed: 7,
        skin_retouching_bool: false,
        ..TrainConfig::default()
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn unet_output(unet: &easyphoto_diffusion::UNet2DConditionModel) -> Tensor {
    let dev = Device::Cpu;
    let x = (Tensor::arange(0f32, 1024.0, &dev).unwrap().reshape((1, 4, 16, 16)).unwrap() * 0.37).unwrap();
    let x = x.sin().unwrap();
    let context = Tensor::arange(0f32, (77 * 32) as f32, &dev).unwrap().reshape((1, 77, 32)).unwrap();
    let context = (context * 1e-3).unwrap().cos().unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    unet.forward(&x, &t, &context, &UNetConditioning::default()).unwrap()
}

#[test]
fn trains_five_photos_validates_twice_fuses_and_resumes_to_the_same_lora() {
    let dir = temp_dir("pipeline_train", "e2e");
    let photos = write_photos(&dir.join("photos"), &astronaut_photos());
    let store = UserStore::new(dir.join("root"));
    let id = UserId::new("宇航员").unwrap();
    let events = Mutex::new(Vec::<(String, u64, Instant)>::new());
    let observer = |e: Progress<'_>| events.lock().unwrap().push((e.stage.to_string(), e.step, Instant::now()));
    let start = Instant::now();
    let mut comps = components();
    let out =
        train_user(&store, &id, Photos::Files(&photos), &config(), &mut comps, &observer, &CancelToken::new()).unwrap();

    // Files at the documented places.
    for i in 0..5 {
        assert!(store.original_photo(&id, i).is_file());
        assert!(store.processed_image(&id, i).is_file(), "crop {i}");
        assert_eq!(std::fs::read_to_string(store.caption(&id, i)).unwrap(), "easyphoto_face, easyphoto, 1person");
    }
    for step in [2, 4] {
        assert!(store.checkpoint(&id, step).is_file());
        for k in 0..2 {
            assert!(store.validation_image(&id, step, k).is_file(), "validation {step}/{k}");
        }
    }
    assert!(!store.checkpoint(&id, 3).exists());
    assert_eq!(out.lora, store.lora_path(&id));
    assert!(out.lora.is_file() && out.best_face.is_file() && store.reference_image(&id).is_file());
    store.check_ready(&id).unwrap();
    let info = store.read_info(&id).unwrap();
    assert_eq!((info.photos_uploaded, info.photos_kept, info.max_train_steps, info.seed), (5, 5, 4, 7));
    assert_eq!(info, out.info);
    assert_eq!(out.scores.len(), 4);
    // Wall time per stage (from the previous event to the stage's last event), for the record.
    let mut previous = start;
    let mut times: Vec<(String, f64)> = vec![];
    for (stage, _, at) in events.lock().unwrap().iter() {
        match times.last_mut() {
            Some((s, t)) if s == stage => *t += (*at - previous).as_secs_f64(),
            _ => times.push((stage.clone(), (*at - previous).as_secs_f64())),
        }
        previous = *at;
    }
    println!("stage wall times (s): {times:.2?}; total {:.2}", start.elapsed().as_secs_f64());
    let stages: Vec<String> = events.lock().unwrap().iter().map(|(s, _, _)| s.clone()).collect();
    for stage in ["original_backup", "preprocess", "train", "validation", "face_id_score"] {
        assert!(stages.iter().any(|s| s == stage), "no progress from {stage}");
    }
    let train_steps: Vec<u64> =
        events.lock().unwrap().iter().filter(|(s, _, _)| s == "train").map(|(_, n, _)| *n).collect();
    assert_eq!(train_steps, vec![1, 2, 3, 4]);

    // The random tiny model paints no face, so no validation image scores and the fusion falls
    // back to the last checkpoint, as EasyPhoto does.
    println!("scores: {:?}", out.scores.iter().map(|s| s.score).collect::<Vec<_>>());
    let expected_steps: Vec<u32> = match fuse::top_scored(&out.scores, 10).as_slice() {
        [] => vec![4],
        top => top.iter().map(|s| s.step).collect(),
    };
    assert_eq!(info.fused_steps, expected_steps);

    // The LoRA loads through the lora crate, covers the UNet and the text encoder, and changes the
    // tiny UNet's output.
    let lora = load_lora(&out.lora, &Device::Cpu).unwrap();
    let checkpoints = fuse::checkpoints(&store.weights_dir(&id)).unwrap();
    let expected = fuse::average_checkpoints(&checkpoints, &info.fused_steps).unwrap();
    let mut worst = 0f32;
    for (name, m) in lora.modules() {
        let e = expected.get(name).unwrap();
        worst = worst.max(max_abs(&m.down, &e.down)).max(max_abs(&m.up, &e.up));
    }
    println!("fused LoRA vs element-wise mean of its checkpoints: max abs {worst:e}");
    assert!(worst <= 1e-3);
    let names: Vec<&str> = lora.modules().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.starts_with("lora_unet_")) && names.iter().any(|n| n.starts_with("lora_te_")));
    let mut unet = tiny_base().unet;
    let before = unet_output(&unet);
    let mut targets = Targets { unet: Some(&mut unet), ..Default::default() };
    let (_merged, reports) = easyphoto_lora::merge(&mut targets, &[(&lora, 1.0)]).unwrap();
    assert!(reports[0].applied > 0);
    let change = max_abs(&unet_output(&unet), &before);
    println!("UNet output change with the user's LoRA: {change:e}");
    assert!(change > 1e-5, "{change}");

    // Each crop holds the face, on white outside the face mask.
    let mtcnn = Mtcnn::new(1).unwrap();
    for i in 0..5 {
        let crop = easyphoto_face::load_rgb(store.processed_image(&id, i)).unwrap();
        assert!(!mtcnn.detect(&crop).unwrap().is_empty(), "no face in crop {i}");
        let white = crop.pixels().filter(|p| p.0.iter().all(|&c| c >= 250)).count();
        assert!(white * 10 > crop.len() / 3, "crop {i}: {white} white pixels");
    }

    // The reference photo is the largest roll score × identity score over the backups.
    let faceres = FaceRes::load(face_asset("human_faceres.onnx"), 1).unwrap();
    let (mut embeddings, mut rolls) = (vec![], vec![]);
    for i in 0..5 {
        let img = easyphoto_face::load_rgb(store.original_photo(&id, i)).unwrap();
        let faces = mtcnn.detect(&img).unwrap();
        let (face, _) = preprocess::left_most(&faces, 3.0, img.width(), img.height()).unwrap();
        rolls.push(roll_score(&face.landmarks));
        embeddings.push(faceres.embed(&img, &face).unwrap());
    }
    let ranking = rank_photos(&embeddings, &rolls, 15).unwrap();
    println!("roll scores {rolls:?}, reference {}", ranking.reference);
    assert_ne!(ranking.reference, 3, "the rotated photo has the worst roll score");
    assert_eq!(
        std::fs::read(store.reference_image(&id)).unwrap(),
        std::fs::read(store.original_photo(&id, ranking.reference)).unwrap()
    );

    // Fusion with scores: the top 3 are steps 2, 2 and 4, so checkpoint 2 counts twice.
    use easyphoto_pipeline::train::face_id_score::Scored;
    let scored = |step: u32, template: usize, score: Option<f32>| Scored {
        step,
        template,
        path: store.validation_image(&id, step, template),
        score,
    };
    let scores = [scored(2, 0, Some(0.7)), scored(2, 1, Some(0.9)), scored(4, 0, None), scored(4, 1, Some(0.5))];
    let fused_id = UserId::new("fused").unwrap();
    let fused = fuse::fuse(&store, &fused_id, &checkpoints, &scores, &[], 3).unwrap();
    assert_eq!((fused.steps.clone(), fused.best_score), (vec![2, 2, 4], Some(0.9)));
    assert_eq!(
        std::fs::read(store.best_face_image(&fused_id)).unwrap(),
        std::fs::read(store.validation_image(&id, 2, 1)).unwrap()
    );
    let (c2, c4) = (
        load_lora(store.checkpoint(&id, 2), &Device::Cpu).unwrap(),
        load_lora(store.checkpoint(&id, 4), &Device::Cpu).unwrap(),
    );
    let mean = |a: &Tensor, b: &Tensor| {
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        ((a * 2.0).unwrap() + b).unwrap() / 3.0
    };
    let fused_lora = load_lora(store.lora_path(&fused_id), &Device::Cpu).unwrap();
    let mut worst = 0f32;
    for (name, m) in fused_lora.modules() {
        let (a, b) = (c2.get(name).unwrap(), c4.get(name).unwrap());
        worst = worst.max(max_abs(&m.down, &mean(&a.down, &b.down).unwrap()));
        worst = worst.max(max_abs(&m.up, &mean(&a.up, &b.up).unwrap()));
        assert_eq!(m.alpha, a.alpha);
    }
    println!("fused top-3 vs (2·c2 + c4)/3: max abs {worst:e}");
    assert!(worst <= 1e-3, "{worst}");

    // Cancelled in the validation of checkpoint 2 (after its first template), then resumed: the
    // same checkpoints, validation images and LoRA.
    let other = UserId::new("resumed").unwrap();
    let cancel = CancelToken::new();
    let stopper = cancel.clone();
    let stop_in_validation = move |e: Progress<'_>| {
        if e.stage == "validation" && e.step == 1 {
            stopper.cancel();
        }
    };
    // This one uploads decoded images (what a server receives): the same backups, the same run.
    let decoded: Vec<RgbImage> = photos.iter().map(|p| easyphoto_face::load_rgb(p).unwrap()).collect();
    let err = train_user(
        &store,
        &other,
        Photos::Images(&decoded),
        &config(),
        &mut components(),
        &stop_in_validation,
        &cancel,
    )
    .unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled { .. }), "{err:?}");
    assert!(store.checkpoint(&other, 2).is_file() && !store.checkpoint(&other, 4).exists());
    assert!(store.validation_image(&other, 2, 0).is_file() && !store.validation_image(&other, 2, 1).exists());
    let resumed = resume_user(&store, &other, &config(), &mut components(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(resumed.info.fused_steps, info.fused_steps);
    for (a, b) in [
        (store.validation_image(&id, 2, 1), store.validation_image(&other, 2, 1)),
        (store.validation_image(&id, 4, 0), store.validation_image(&other, 4, 0)),
    ] {
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{} vs {}", a.display(), b.display());
    }
    // safetensors headers may order their metadata differently: compare the tensors.
    for (a, b) in
        [(store.checkpoint(&id, 4), store.checkpoint(&other, 4)), (store.lora_path(&id), store.lora_path(&other))]
    {
        let (a, b) = (load_lora(&a, &Device::Cpu).unwrap(), load_lora(&b, &Device::Cpu).unwrap());
        assert_eq!(a.len(), b.len());
        for (name, m) in a.modules() {
            let n = b.get(name).unwrap();
            assert_eq!((max_abs(&m.down, &n.down), max_abs(&m.up, &n.up), m.alpha), (0.0, 0.0, n.alpha), "{name}");
        }
    }
}

#[test]
fn the_ranking_drops_another_person_and_faceless_photos_are_skipped() {
    let dir = temp_dir("pipeline_train", "ranking");
    let mut photos = astronaut_photos();
    photos.push(other_person());
    photos.push(RgbImage::from_fn(200, 160, |x, y| image::Rgb([x as u8, y as u8, 128])));
    let names = write_photos(&dir, &photos);
    let comps = components();
    let config = TrainConfig { max_training_photos: 5, ..config() };
    let pre = preprocess::preprocess(
        &photos,
        &names,
        &config,
        comps.detector.as_ref(),
        comps.embedder.as_ref(),
        comps.segmenter.as_ref(),
        &Silent,
        &CancelToken::new(),
    )
    .unwrap();
    println!("id scores {:?}, kept {:?}", pre.id_scores, pre.kept);
    assert_eq!(pre.no_face, vec![6]);
    let mut kept = pre.kept.clone();
    kept.sort();
    assert_eq!(kept, vec![0, 1, 2, 3, 4], "the other person (5) is dropped");
    let other = pre.id_scores.iter().find(|(i, _)| *i == 5).unwrap().1;
    assert!(pre.id_scores.iter().filter(|(i, _)| *i != 5).all(|(_, s)| *s > other + 0.05), "{:?}", pre.id_scores);
    assert_eq!(pre.crops.len(), 5);

    // Only faceless photos: a typed error naming them.
    let blank = vec![photos[6].clone(), photos[6].clone()];
    let err = preprocess::preprocess(
        &blank,
        &names[5..7],
        &config,
        comps.detector.as_ref(),
        comps.embedder.as_ref(),
        comps.segmenter.as_ref(),
        &Silent,
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(matches!(err, PipelineError::TooFewFaces { found: 0, .. }), "{err:?}");
    assert!(err.to_string().contains("06.png"), "{err}");
}

#[test]
fn identity_scores_rank_the_same_person_above_another() {
    let comps = components();
    let face = |img: &RgbImage| {
        easyphoto_pipeline::train::face_id_score::face_embedding(img, comps.detector.as_ref(), comps.embedder.as_ref())
            .unwrap()
            .unwrap()
    };
    let photos = astronaut_photos();
    let references: Vec<Vec<f32>> = photos[1..].iter().map(&face).collect();
    let same = identity_score(&face(&photos[0]), &references).unwrap();
    let other = identity_score(&face(&other_person()), &references).unwrap();
    println!("mean identity score: same person {same:.3}, other person {other:.3}");
    assert!(same > 0.8 && other < 0.6, "{same} {other}");
    assert_eq!(identity_score(&[1.0], &[]), None);
    let nothing = RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]));
    assert!(
        easyphoto_pipeline::train::face_id_score::face_embedding(
            &nothing,
            comps.detector.as_ref(),
            comps.embedder.as_ref()
        )
        .unwrap()
        .is_none()
    );
}

#[test]
fn bad_inputs_are_typed_errors_and_leave_nothing_behind() {
    let dir = temp_dir("pipeline_train", "bad");
    let root = dir.join("root");
    let store = UserStore::new(&root);
    assert!(matches!(UserId::new("../../etc"), Err(PipelineError::InvalidUserId { .. })));
    assert!(matches!(UserId::new("a/b"), Err(PipelineError::InvalidUserId { .. })));

    // Too few photos for the job check.
    let few = write_photos(&dir.join("few"), &astronaut_photos()[..3]);
    let ws = easyphoto_pipeline::Workspace {
        store: store.clone(),
        models_dir: dir.join("models"),
        endpoint: "http://127.0.0.1:9".into(),
    };
    let manifest = easyphoto_pipeline::Manifest::embedded().unwrap();
    let err = easyphoto_pipeline::TrainJob::check(
        &ws,
        &manifest,
        UserId::new("x").unwrap(),
        few[0].parent().unwrap(),
        TrainConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, PipelineError::TooFewPhotos { found: 3, minimum: 5, .. }), "{err:?}");

    // Faceless photos: the flow stops before training, names them, and leaves no user behind.
    let blank: Vec<RgbImage> =
        (0..5).map(|k| RgbImage::from_fn(96, 80, |x, y| image::Rgb([x as u8, y as u8, 40 * k as u8]))).collect();
    let blank = write_photos(&dir.join("blank"), &blank);
    let id = UserId::new("nobody").unwrap();
    for _ in 0..2 {
        let err =
            train_user(&store, &id, Photos::Files(&blank), &config(), &mut components(), &Silent, &CancelToken::new())
                .unwrap_err();
        assert!(matches!(err, PipelineError::TooFewFaces { found: 0, .. }), "{err:?}");
        assert!(err.to_string().contains("04.png"), "{err}");
        assert!(walk(&root).is_empty(), "{:?}", walk(&root));
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![];
    let Ok(entries) = std::fs::read_dir(dir) else { return files };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Set in the child process of [`a_killed_training_resumes_to_the_uninterrupted_lora`]: the
/// folder it trains in.
const CHILD_DIR: &str = "EASYPHOTO_PIPELINE_TRAIN_CHILD_DIR";

/// The user of the killed run.
const KILLED: &str = "被杀";

/// Every file under `dir` that is not an atomic write's temporary (`.tmp*`, left by the kill).
fn files_and_temporaries(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    walk(dir).into_iter().partition(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
}

/// Runs this test binary as the training child in `child_dir` (a new training, or a resumed one
/// once `user.json` exists) and kills it with SIGKILL as soon as `file` exists; then checks that
/// every file the child left is whole (checkpoints and the trainer state load, images decode,
/// JSON parses) and returns them.
fn kill_child_at(child_dir: &Path, store: &UserStore, id: &UserId, file: &Path) -> Vec<PathBuf> {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_killed_training_resumes_to_the_uninterrupted_lora", "--test-threads=1"])
        .env(CHILD_DIR, child_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !file.is_file() {
        assert!(start.elapsed().as_secs() < 300, "the child did not write {}", file.display());
        assert!(child.try_wait().unwrap().is_none(), "the child ended early");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());
    let (files, temporaries) = files_and_temporaries(&store.user_dir(id));
    println!("killed after {}: {} files, temporaries {temporaries:?}", file.display(), files.len());
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        if name.ends_with(".safetensors") && name.starts_with("checkpoint-") {
            load_lora(path, &Device::Cpu).unwrap();
        } else if name.ends_with(".safetensors") {
            candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        } else if name.ends_with(".jpg") || name.ends_with(".png") {
            easyphoto_face::load_rgb(path).unwrap();
        } else if name.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(path).unwrap()).unwrap();
        }
    }
    files
}

/// The train flow as a process killed with SIGKILL twice (in the validation of checkpoint 2,
/// then, resumed, in that of checkpoint 4), then resumed: every file it left is whole, and the
/// last run ends with the bytes of an uninterrupted one. The test binary runs itself as the
/// child (this test, with [`CHILD_DIR`] set), which trains with a pause after every step and
/// validation image so that the kills land inside the flow.
#[test]
fn a_killed_training_resumes_to_the_uninterrupted_lora() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let dir = PathBuf::from(dir);
        let slow = |e: Progress<'_>| {
            if e.stage == "train" || e.stage == "validation" {
                std::thread::sleep(std::time::Duration::from_millis(400));
            }
        };
        let id = UserId::new(KILLED).unwrap();
        let store = UserStore::new(dir.join("root"));
        if store.info_path(&id).is_file() {
            resume_user(&store, &id, &config(), &mut components(), &slow, &CancelToken::new()).unwrap();
        } else {
            let photos = write_photos(&dir.join("photos"), &astronaut_photos());
            train_user(&store, &id, Photos::Files(&photos), &config(), &mut components(), &slow, &CancelToken::new())
                .unwrap();
        }
        return;
    }

    // The uninterrupted run.
    let dir = temp_dir("pipeline_train", "killed");
    let whole_store = UserStore::new(dir.join("whole"));
    let whole = UserId::new("whole").unwrap();
    let photos = write_photos(&dir.join("photos"), &astronaut_photos());
    let uninterrupted = train_user(
        &whole_store,
        &whole,
        Photos::Files(&photos),
        &config(),
        &mut components(),
        &Silent,
        &CancelToken::new(),
    )
    .unwrap();

    let child_dir = dir.join("child");
    std::fs::create_dir_all(&child_dir).unwrap();
    let store = UserStore::new(child_dir.join("root"));
    let id = UserId::new(KILLED).unwrap();
    kill_child_at(&child_dir, &store, &id, &store.validation_image(&id, 2, 0));
    assert!(store.checkpoint(&id, 2).is_file());
    assert!(!store.checkpoint(&id, 4).exists(), "killed too late");
    let modified = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let first_checkpoint = modified(store.checkpoint(&id, 2));
    kill_child_at(&child_dir, &store, &id, &store.validation_image(&id, 4, 0));
    assert!(!store.lora_path(&id).exists(), "killed too late");
    let last_checkpoint = modified(store.checkpoint(&id, 4));

    // `easyphoto train --resume`: the same checkpoints, validation images and final LoRA, byte
    // for byte (a safetensors header is compared as JSON: the safetensors crate writes its
    // metadata map in a per-process hash order).
    let resumed = resume_user(&store, &id, &config(), &mut components(), &Silent, &CancelToken::new()).unwrap();
    assert_eq!(resumed.info.fused_steps, uninterrupted.info.fused_steps);
    // Each run continued where the last one stopped rather than starting over.
    assert_eq!(modified(store.checkpoint(&id, 2)), first_checkpoint);
    assert_eq!(modified(store.checkpoint(&id, 4)), last_checkpoint);
    let pairs = [
        (whole_store.lora_path(&whole), store.lora_path(&id)),
        (whole_store.checkpoint(&whole, 2), store.checkpoint(&id, 2)),
        (whole_store.checkpoint(&whole, 4), store.checkpoint(&id, 4)),
        (whole_store.best_face_image(&whole), store.best_face_image(&id)),
        (whole_store.validation_image(&whole, 4, 1), store.validation_image(&id, 4, 1)),
    ];
    for (a, b) in pairs {
        let (a_bytes, b_bytes) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let same = if a.extension().is_some_and(|e| e == "safetensors") {
            safetensors_parts(&a_bytes) == safetensors_parts(&b_bytes)
        } else {
            a_bytes == b_bytes
        };
        assert!(same, "{} vs {}", a.display(), b.display());
    }
}

/// A safetensors file's header (as JSON) and its data bytes.
fn safetensors_parts(bytes: &[u8]) -> (serde_json::Value, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), &bytes[8 + n..])
}
