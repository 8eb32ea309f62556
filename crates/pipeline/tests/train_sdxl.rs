//! The train flow on an SDXL base, then the creative path with the trained LoRA: tiny random SDXL
//! components with real layouts (the lora crate's SDXL UNet and text encoders, the diffusion
//! crate's VAE and tokenizer, assembled as a diffusers folder) and the real face models on five
//! real photos (the face crate's astronaut photo, seen five ways). Needs ORT_DYLIB_PATH.

mod support;

use std::path::Path;
use support::{astronaut_photos, face_asset, temp_dir, tiny_sdxl, write_photos};

use candle_core::{DType, Device};
use easyphoto_face::{FaceRes, HumanSelfie, Mtcnn};
use easyphoto_lora::{BaseFamily, KohyaLora, lora_family};
use easyphoto_pipeline::creative::{CreativeComponents, CreativeConfig, create, load_sdxl};
use easyphoto_pipeline::train::fuse;
use easyphoto_pipeline::{
    BaseModel, CancelToken, Photos, PipelineError, Progress, Silent, TrainComponents, TrainConfig, UserId, UserStore,
    resume_user, train_user,
};

fn components(model: &Path) -> TrainComponents {
    TrainComponents {
        base: BaseModel::load(model, DType::F32, &Device::Cpu).unwrap(),
        detector: Box::new(Mtcnn::new(1).unwrap()),
        embedder: Box::new(FaceRes::load(face_asset("human_faceres.onnx"), 1).unwrap()),
        segmenter: Box::new(HumanSelfie::new(1).unwrap()),
        templates: vec![],
    }
}

/// EasyPhoto's SDXL recipe (rank 32, alpha 16, no validation), shortened: 3 steps with a
/// checkpoint every 2, 64² crops.
fn config() -> TrainConfig {
    TrainConfig {
        resolution: 64,
        max_train_steps: 3,
        val_and_checkpointing_steps: 2,
        learning_rate: 1e-3,
        seed: 7,
        skin_retouching_bool: false,
        ..TrainConfig::sdxl()
    }
}

#[test]
fn sdxl_base_trains_the_users_sdxl_lora_and_creative_paints_with_it() {
    let dir = temp_dir("pipeline_train_sdxl", "e2e");
    let model = tiny_sdxl(&dir);
    let photos = write_photos(&dir.join("photos"), &astronaut_photos());
    let store = UserStore::new(dir.join("root"));
    let mut comps = components(&model);
    assert!(comps.base.is_sdxl());

    // EasyPhoto refuses validation for SDXL; nothing is written.
    let id = UserId::new("宇航员").unwrap();
    let with_validation = TrainConfig { validation: true, ..config() };
    match train_user(&store, &id, Photos::Files(&photos), &with_validation, &mut comps, &Silent, &CancelToken::new()) {
        Err(PipelineError::InvalidParameter { field, .. }) => assert_eq!(field, "validation"),
        other => panic!("{other:?}"),
    }
    assert!(!store.user_dir(&id).exists());

    let out =
        train_user(&store, &id, Photos::Files(&photos), &config(), &mut comps, &Silent, &CancelToken::new()).unwrap();

    // Checkpoints at 2 and 3, no validation; the final LoRA is the last checkpoint's weights
    // (EasyPhoto's SDXL training keeps its last weights), at the place creative reads.
    let checkpoints: Vec<u32> =
        fuse::checkpoints(&store.weights_dir(&id)).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(checkpoints, [2, 3]);
    assert!(!store.weights_dir(&id).join("validation").exists());
    assert!(out.scores.is_empty());
    assert_eq!(out.lora, store.lora_path(&id));
    assert!(out.lora.is_file() && out.best_face.is_file());
    store.check_ready(&id).unwrap();
    let info = store.read_info(&id).unwrap();
    assert_eq!((info.photos_kept, info.max_train_steps, info.fused_steps.clone()), (5, 3, vec![3]));
    assert_eq!(info.sd_model_checkpoint, "tiny-sdxl");

    // An SDXL kohya LoRA of rank 32 / alpha 16 over the UNet and both text encoders.
    let lora = KohyaLora::load(&out.lora, &Device::Cpu).unwrap();
    let last = KohyaLora::load(store.checkpoint(&id, 3), &Device::Cpu).unwrap();
    let count = |prefix: &str| lora.modules().filter(|(name, _)| name.starts_with(prefix)).count();
    assert_eq!((count("lora_unet_"), count("lora_te1_"), count("lora_te2_")), (88, 12, 12));
    assert_eq!(lora.modules().count(), 112);
    assert_eq!(lora.metadata().get("ss_base_model_version").map(String::as_str), Some("sdxl_base_v1-0"));
    assert_eq!(lora.metadata().get("ss_network_dim").map(String::as_str), Some("32"));
    assert_eq!(lora_family(&lora).map(|(f, _)| f), Some(BaseFamily::Sdxl));
    let mut moved = 0;
    for (name, m) in lora.modules() {
        assert_eq!(m.down.dims()[0], 32, "{name}");
        assert_eq!(m.alpha, Some(16.0), "{name}");
        let l = last.get(name).unwrap();
        let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
            let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
            d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert_eq!((diff(&m.down, &l.down), diff(&m.up, &l.up)), (0.0, 0.0), "{name}");
        moved += usize::from(diff(&m.up, &m.up.zeros_like().unwrap()) > 0.0);
    }
    assert!(moved >= 88, "trained modules: {moved}");

    // Cancelled after step 2, then resumed: the same final LoRA as the uninterrupted run.
    let resumed = UserId::new("resumed").unwrap();
    let cancel = CancelToken::new();
    let stopper = cancel.clone();
    let stop_after_2 = move |e: Progress<'_>| {
        if e.stage == "train" && e.step == 2 {
            stopper.cancel();
        }
    };
    match train_user(&store, &resumed, Photos::Files(&photos), &config(), &mut comps, &stop_after_2, &cancel) {
        Err(PipelineError::Cancelled { stage }) => assert_eq!(stage, "train"),
        other => panic!("{other:?}"),
    }
    assert!(store.checkpoint(&resumed, 2).is_file() && !store.lora_path(&resumed).exists());
    resume_user(&store, &resumed, &config(), &mut comps, &Silent, &CancelToken::new()).unwrap();
    assert_eq!(std::fs::read(store.lora_path(&resumed)).unwrap(), std::fs::read(&out.lora).unwrap());

    // `creative` with the user's final LoRA; one seed, one image.
    let mut creative = CreativeComponents {
        sd: load_sdxl(&model, DType::F32, &Device::Cpu).unwrap(),
        detector: Box::new(Mtcnn::new(1).unwrap()),
        embedder: Box::new(FaceRes::load(face_asset("human_faceres.onnx"), 1).unwrap()),
    };
    let request = CreativeConfig {
        text_to_image_width: 64,
        text_to_image_height: 48,
        diffusion_steps: 4,
        seed: 11,
        ..CreativeConfig::default()
    };
    let paint = |creative: &mut CreativeComponents, out: &Path| {
        let created = create(&store, &id, None, creative, &request, out, &Silent, &CancelToken::new()).unwrap();
        assert_eq!(created.len(), 1);
        assert_eq!(created[0].image, out.join("宇航员-11.png"));
        std::fs::read(&created[0].image).unwrap()
    };
    let first = paint(&mut creative, &dir.join("out1"));
    let second = paint(&mut creative, &dir.join("out2"));
    assert_eq!(image::load_from_memory(&first).unwrap().to_rgb8().dimensions(), (64, 48));
    assert_eq!(first, second, "one seed, one image");
}
