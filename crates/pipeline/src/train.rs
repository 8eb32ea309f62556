//! EasyPhoto's train flow (anatomy §1), composed from the other crates and readable top to
//! bottom in [`train_user`]:
//!
//! 1. the photos, EXIF-transposed, backed up as RGB JPEGs ([`original_backup`](crate::original_backup));
//! 2. [`preprocess`]: face detection, identity ranking (top 15) and the reference photo (roll angle
//!    × identity), 3× crops, saliency ∩ widened box on white;
//! 3. the training set written with the fixed caption ([`training_set`](crate::training_set));
//! 4. LoRA training ([`easyphoto_lora::train`]), with [`validation`] at every checkpoint;
//! 5. [`face_id_score`]: each validation image against the training faces;
//! 6. [`fuse`]: the element-wise mean of the checkpoints of the best validation images, and the
//!    best face image.
//!
//! Every file lands at its place of the [user layout](crate::user) through atomic writes.
//! Progress goes to an [`Observer`]; the [`CancelToken`] is polled between photos, optimizer
//! steps and sampler steps. A cancelled or killed run continues with [`resume_user`] (the
//! trainer's resumable state, then the validations that are missing).
//!
//! An SDXL base checkpoint trains an SDXL LoRA ([`easyphoto_lora::train_sdxl`]) with
//! EasyPhoto's SDXL recipe ([`TrainConfig::sdxl`], `train_lora_sd_XL.py`): 1024², at most 600
//! steps, rank 32, alpha 16, both text encoders trained (`lora_te1_` / `lora_te2_`), and no
//! validation: EasyPhoto refuses validation for SDXL and copies the last weights as the user's
//! LoRA, so the final LoRA is the last checkpoint (step 6's fallback) and `face_id.jpg` the best
//! training crop. The LoRA lands at the same place as SD1.5's, where the
//! [creative path](crate::creative) looks for it.
//!
//! Not available here: EasyPhoto's skin retouching and GPEN portrait enhancement of small crops
//! (ModelScope models without a portable export); `skin_retouching_bool` is reported as skipped.

pub mod face_id_score;
pub mod fuse;
pub mod preprocess;
pub mod validation;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use easyphoto_diffusion::text_encoding::{Encoder, Layer, PromptEncoder, TextEncoders};
use easyphoto_diffusion::{
    AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, ClipTokenizer, ModelFamily, PadToken, SingleFile,
    StableDiffusion, TextEncoderSlot, UNet2DConditionModel, diffusers_folder,
};
use easyphoto_face::{ArcFace, FaceDetector, FaceEmbedder, Scrfd, Segmenter, U2Net};
use easyphoto_lora::{KohyaLora, SdxlTrainModels, Targets, TrainImage, TrainModels};
use image::RgbImage;

use crate::config::TrainConfig;
use crate::error::{PipelineError, Result};
use crate::models::{Flow, Manifest};
use crate::original_backup::{save_original_backup, save_original_images};
use crate::progress::{CancelToken, Observer, Progress};
use crate::training_set::{load_training_set, save_training_set};
use crate::user::{UserId, UserInfo, UserStore, write_atomic};

/// Progress stage of the LoRA training (one step per optimizer step).
pub const TRAIN_STAGE: &str = "train";

/// SDXL's second tokenizer pads with `!`, id 0.
const SDXL_PAD_TOKEN_2: u32 = 0;

impl TrainConfig {
    /// EasyPhoto's SDXL recipe, what its UI switches to when an SDXL checkpoint is picked (PR
    /// #193): resolution 1024, at most 600 steps, rank 32, alpha 16, validation off; learning
    /// rates, batch and steps per photo as for SD1.5. The checkpoint is the creative path's.
    pub fn sdxl() -> Self {
        Self {
            sd_model_checkpoint: crate::creative::CreativeConfig::default().sd_model_checkpoint,
            resolution: 1024,
            max_train_steps: 600,
            rank: 32,
            network_alpha: 16,
            validation: false,
            ..Self::default()
        }
    }
}

/// The base model that is trained and sampled (SD1.x, or SDXL): its parts kept apart, because
/// training adapts the UNet and the text encoders while validation samples from fresh copies.
#[derive(Debug, Clone)]
pub struct BaseModel {
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: CLIPTextModel,
    /// SDXL's second, projected text encoder; `None` for SD1.x.
    pub text_encoder_2: Option<CLIPTextModelWithProjection>,
    /// The (first) text encoder's tokenizer.
    pub tokenizer: ClipTokenizer,
    /// A1111's clip skip (1 = off).
    pub clip_skip: usize,
    /// The scheduler settings samplers take their betas from.
    pub scheduler_config: serde_json::Value,
    /// The checkpoint's file name, recorded in `user.json`.
    pub name: String,
}

impl BaseModel {
    /// Loads an SD1.x or SDXL single-file checkpoint or diffusers folder; other families are
    /// refused (EasyPhoto rejects SD2).
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let not_sd1 = |family: ModelFamily| PipelineError::InvalidInput {
            path: path.to_path_buf(),
            reason: format!("a {family:?} checkpoint; face LoRAs are trained on SD1.x or SDXL"),
        };
        if is_sdxl_checkpoint(path) {
            return Self::load_sdxl(path, name, dtype, device);
        }
        if path.is_dir() {
            let sd = StableDiffusion::from_diffusers_folder(path, 1, dtype, device)?;
            if sd.family != ModelFamily::Sd1 {
                return Err(not_sd1(sd.family));
            }
            return Ok(Self {
                unet: sd.unet,
                vae: sd.vae,
                text_encoder: diffusers_folder::load_clip_text_model(&path.join("text_encoder"), None, dtype, device)?,
                text_encoder_2: None,
                tokenizer: ClipTokenizer::from_folder(path.join("tokenizer"))?,
                clip_skip: 1,
                scheduler_config: sd.scheduler_config,
                name,
            });
        }
        let file = SingleFile::open(path)?;
        let family = file.family()?;
        if family != ModelFamily::Sd1 {
            return Err(not_sd1(family));
        }
        let slot = TextEncoderSlot::TextEncoder;
        Ok(Self {
            unet: file.load_unet(&file.unet_config()?, dtype, device)?,
            vae: file.load_vae(&file.vae_config()?, dtype, device)?,
            text_encoder: file.load_text_encoder(slot, &file.text_encoder_config(slot)?, dtype, device)?,
            text_encoder_2: None,
            tokenizer: ClipTokenizer::embedded(PadToken::EndOfText)?,
            clip_skip: 1,
            scheduler_config: serde_json::json!({
                "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "steps_offset": 1, "prediction_type": "epsilon",
            }),
            name,
        })
    }

    /// An SDXL model's parts ([`load_sdxl`](crate::creative::load_sdxl)), the tokenizer being
    /// the first encoder's.
    fn load_sdxl(path: &Path, name: String, dtype: DType, device: &Device) -> Result<Self> {
        let mut sd = crate::creative::load_sdxl(path, dtype, device)?;
        let tokenizer = if path.is_dir() {
            ClipTokenizer::from_folder(path.join("tokenizer"))?
        } else {
            ClipTokenizer::embedded(PadToken::EndOfText)?
        };
        let (text_encoder, text_encoder_2) = {
            let mut encoders = sd.text_encoders.encoders_mut();
            match (encoders.next(), encoders.next()) {
                (Some(Encoder::Plain(l)), Some(Encoder::Projected(g))) => (l.clone(), g.clone()),
                _ => {
                    return Err(PipelineError::InvalidInput {
                        path: path.to_path_buf(),
                        reason: "an SDXL model without CLIP-L and a projected second text encoder".into(),
                    });
                }
            }
        };
        Ok(Self {
            unet: sd.unet,
            vae: sd.vae,
            text_encoder,
            text_encoder_2: Some(text_encoder_2),
            tokenizer,
            clip_skip: 1,
            scheduler_config: sd.scheduler_config,
            name,
        })
    }

    /// Whether this is an SDXL model.
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// A sampling model of these weights with `lora` merged at multiplier 1 (EasyPhoto's
    /// validation: a fresh copy of the base with the current LoRA merged). The base is untouched.
    /// SD1.x only: SDXL trainings are not validated.
    pub fn with_lora(&self, lora: Option<&KohyaLora>) -> Result<StableDiffusion> {
        if self.is_sdxl() {
            return Err(sdxl_validation());
        }
        let (mut unet, mut text_encoder) = (self.unet.clone(), self.text_encoder.clone());
        if let Some(lora) = lora {
            let mut targets =
                Targets { unet: Some(&mut unet), text_encoder: Some(&mut text_encoder), ..Default::default() };
            let (_merged, reports) = easyphoto_lora::merge(&mut targets, &[(lora, 1.0)])?;
            reports.iter().try_for_each(|r| r.ensure_complete())?;
        }
        Ok(StableDiffusion {
            unet,
            vae: self.vae.clone(),
            text_encoders: TextEncoders::new(vec![PromptEncoder {
                tokenizer: self.tokenizer.clone(),
                encoder: Encoder::Plain(text_encoder),
                layer: Layer::Normed { skip: self.clip_skip },
            }])?,
            family: ModelFamily::Sd1,
            scheduler_config: self.scheduler_config.clone(),
        })
    }
}

/// Everything the train flow runs besides the parameters.
pub struct TrainComponents {
    pub base: BaseModel,
    pub detector: Box<dyn FaceDetector>,
    pub embedder: Box<dyn FaceEmbedder>,
    /// Saliency of the training crops (EasyPhoto: U²-Net).
    pub segmenter: Box<dyn Segmenter>,
    /// Validation templates (EasyPhoto's `training_templates/1..4.jpg`), with their names.
    pub templates: Vec<(String, RgbImage)>,
}

impl TrainComponents {
    /// The train flow's models under `models_dir`, as the manifest places them (refusing with the
    /// offline error that lists what is missing): the base checkpoint (`config.sd_model_checkpoint`
    /// when that is an existing path, otherwise that file name beside the default base), SCRFD,
    /// ArcFace, U²-Net and, when `config.validation` is on, the four validation templates. ONNX
    /// models run on `threads` threads.
    pub fn from_models_dir(
        manifest: &Manifest,
        models_dir: &Path,
        config: &TrainConfig,
        endpoint: &str,
        dtype: DType,
        device: &Device,
        threads: usize,
    ) -> Result<Self> {
        require_train_models(manifest, models_dir, config, endpoint)?;
        let path = |name: &str| manifest.get(name).map(|m| m.local_path(models_dir));
        let base = base_checkpoint(manifest, models_dir, config)?;
        let templates = if config.validation {
            (1..=4)
                .map(|k| {
                    let file = path(&format!("template-{k}"))?;
                    Ok((format!("{k}.jpg"), easyphoto_face::load_rgb(&file)?))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![]
        };
        Ok(Self {
            base: BaseModel::load(&base, dtype, device)?,
            detector: Box::new(Scrfd::load(path("scrfd-10g")?, threads)?),
            embedder: Box::new(ArcFace::load(path("arcface-r50")?, threads)?),
            segmenter: Box::new(U2Net::load(path("u2net")?, threads)?),
            templates,
        })
    }
}

/// Refuses a training run whose model files are missing, with the offline error that lists
/// them: the manifest's training files, less the validation templates when validation is off and
/// the default base when `config` names another one.
pub fn require_train_models(
    manifest: &Manifest,
    models_dir: &Path,
    config: &TrainConfig,
    endpoint: &str,
) -> Result<()> {
    let base = base_checkpoint(manifest, models_dir, config)?;
    manifest.require_only(models_dir, Some(Flow::Train), endpoint, |m| match m.name.as_str() {
        name if name.starts_with("template-") => config.validation,
        "chilloutmix" => m.path == base,
        _ => true,
    })
}

/// The base checkpoint `config.sd_model_checkpoint` names: that path when it exists, otherwise
/// that file name beside the default base.
pub fn base_checkpoint(manifest: &Manifest, models_dir: &Path, config: &TrainConfig) -> Result<PathBuf> {
    let named = Path::new(&config.sd_model_checkpoint);
    if named.exists() {
        return Ok(named.to_path_buf());
    }
    let default = manifest.get("chilloutmix")?.local_path(models_dir);
    Ok(default.parent().unwrap_or(models_dir).join(&config.sd_model_checkpoint))
}

/// Whether `path` is an SDXL base model: a diffusers folder with `text_encoder_2`, or a single
/// file whose keys say SDXL. Unreadable files are not.
pub fn is_sdxl_checkpoint(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("text_encoder_2").is_dir();
    }
    SingleFile::open(path).and_then(|f| f.family()).is_ok_and(|family| family == ModelFamily::Sdxl)
}

/// EasyPhoto's refusal of validation for SDXL.
fn sdxl_validation() -> PipelineError {
    PipelineError::InvalidParameter {
        field: "validation".into(),
        reason: "SDXL LoRAs are trained without validation, as EasyPhoto does (the final LoRA is the last \
                 checkpoint); set validation = false (EasyPhoto's SDXL recipe: TrainConfig::sdxl)"
            .into(),
    }
}

/// Refuses what the base model's family cannot train with.
fn check_family(config: &TrainConfig, base: &BaseModel) -> Result<()> {
    if base.is_sdxl() && config.validation {
        return Err(sdxl_validation());
    }
    Ok(())
}

/// The uploaded photos: image files (decoded and EXIF-transposed here) or images already decoded
/// upright (a server's uploads).
#[derive(Debug, Clone, Copy)]
pub enum Photos<'a> {
    Files(&'a [PathBuf]),
    Images(&'a [RgbImage]),
}

impl Photos<'_> {
    pub fn len(&self) -> usize {
        match self {
            Self::Files(f) => f.len(),
            Self::Images(i) => i.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a finished training produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub info: UserInfo,
    /// The final (fused) LoRA, what inference loads.
    pub lora: PathBuf,
    /// The best validation face (or the best training crop when there is no scored validation image).
    pub best_face: PathBuf,
    /// Every validation image with its face-identity score (`None`: no face found in it).
    pub scores: Vec<face_id_score::Scored>,
}

/// Trains user `id` from `photos`. The id must be new (see [`TrainJob`](crate::jobs::TrainJob)
/// for the full input checks).
pub fn train_user(
    store: &UserStore,
    id: &UserId,
    photos: Photos<'_>,
    config: &TrainConfig,
    components: &mut TrainComponents,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<TrainOutcome> {
    config.validate()?;
    check_family(config, &components.base)?;
    store.check_new(id)?;
    let seed = if config.seed < 0 { rand::random_range(1..1_000_000) } else { config.seed as u64 };

    // Until training starts, a failure removes the new user's folder, so the id stays free.
    let prepared = prepare(store, id, photos, config, seed, components, observer, cancel);
    let info = match prepared {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_dir_all(store.user_dir(id));
            return Err(e);
        }
    };

    // 4.–6. Training with validation, scores, fusion.
    finish(store, id, info, config, components, observer, cancel)
}

/// Continues a cancelled or killed training of `id` from its last checkpoint (same parameters),
/// then validates what was not validated and fuses.
pub fn resume_user(
    store: &UserStore,
    id: &UserId,
    config: &TrainConfig,
    components: &mut TrainComponents,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<TrainOutcome> {
    config.validate()?;
    check_family(config, &components.base)?;
    let info = store.read_info(id)?;
    finish(store, id, info, config, components, observer, cancel)
}

/// Steps 1 to 3: backups, preprocessing, reference photo, training set and `user.json`.
#[allow(clippy::too_many_arguments)]
fn prepare(
    store: &UserStore,
    id: &UserId,
    photos: Photos<'_>,
    config: &TrainConfig,
    seed: u64,
    components: &TrainComponents,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<UserInfo> {
    // 1. The uploads, EXIF-transposed RGB JPEGs; the rest of the flow reads these backups.
    let backups = match photos {
        Photos::Files(files) => save_original_backup(store, id, files, observer, cancel)?,
        Photos::Images(images) => save_original_images(store, id, images, observer, cancel)?,
    };
    let names = match photos {
        Photos::Files(files) => files,
        Photos::Images(_) => &backups[..],
    };
    let images = backups.iter().map(easyphoto_face::load_rgb).collect::<std::result::Result<Vec<_>, _>>()?;

    // 2. Faces, identity ranking, reference photo, crops on white.
    if config.skin_retouching_bool {
        let message = "skin retouching is not available in this build; crops are not retouched";
        observer.progress(Progress { stage: preprocess::STAGE, step: 0, total: None, message });
    }
    let pre = preprocess::preprocess(
        &images,
        names,
        config,
        components.detector.as_ref(),
        components.embedder.as_ref(),
        components.segmenter.as_ref(),
        observer,
        cancel,
    )?;
    let reference = &backups[pre.reference];
    let bytes = std::fs::read(reference).map_err(|source| PipelineError::Read { path: reference.clone(), source })?;
    write_atomic(&store.reference_image(id), &bytes)?;

    // 3. The training set with EasyPhoto's fixed caption.
    save_training_set(store, id, &pre.crops, &config.validation_prompt)?;
    let info = UserInfo {
        user_id: id.as_str().to_string(),
        sd_model_checkpoint: components.base.name.clone(),
        photos_uploaded: photos.len(),
        photos_kept: pre.crops.len(),
        max_train_steps: config.train_steps(pre.crops.len()),
        seed,
        fused_steps: vec![],
        best_face_score: None,
    };
    store.write_info(id, &info)?;
    Ok(info)
}

/// Steps 4 to 6, shared by a fresh and a resumed run.
fn finish(
    store: &UserStore,
    id: &UserId,
    mut info: UserInfo,
    config: &TrainConfig,
    components: &mut TrainComponents,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<TrainOutcome> {
    let set = load_training_set(store, id)?;
    let data = set
        .iter()
        .map(|(image, caption)| {
            Ok(TrainImage { image: image.clone(), input_ids: components.base.tokenizer.encode_padded(caption)? })
        })
        .collect::<Result<Vec<_>>>()?;
    let crops: Vec<RgbImage> = set.into_iter().map(|(image, _)| image).collect();
    let templates = if config.validation {
        validation::prepare_templates(&components.templates, config, components.detector.as_ref())?
    } else {
        vec![]
    };

    // 4. LoRA training; every checkpoint is validated on a fresh copy of the base model.
    let frozen = components.base.clone();
    let lora_config = lora_config(config, &info);
    let weights_dir = store.weights_dir(id);
    // A failed validation stops the training at the next step and is the run's error.
    let failure = std::cell::RefCell::new(None::<PipelineError>);
    {
        let mut on_checkpoint = |path: &Path, step: usize| {
            if failure.borrow().is_none()
                && let Err(e) = validation::validate_checkpoint(
                    store,
                    id,
                    &frozen,
                    path,
                    step as u32,
                    &templates,
                    config,
                    info.seed,
                    observer,
                    cancel,
                )
            {
                *failure.borrow_mut() = Some(e);
            }
        };
        let mut on_step = |p: &easyphoto_lora::Progress| {
            let message = format!("loss {:.4}", p.loss);
            let event = Progress {
                stage: TRAIN_STAGE,
                step: p.step as u64,
                total: Some(p.max_steps as u64),
                message: &message,
            };
            observer.progress(event);
            let stop = cancel.is_cancelled() || failure.borrow().is_some();
            if stop { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        };
        let base = &mut components.base;
        let callbacks =
            easyphoto_lora::Callbacks { progress: Some(&mut on_step), checkpoint: Some(&mut on_checkpoint) };
        let (unet, text_encoder, vae) = (&mut base.unet, &mut base.text_encoder, &base.vae);
        let trained = match base.text_encoder_2.as_mut() {
            None => {
                let models = TrainModels { unet, text_encoder, vae };
                easyphoto_lora::train(models, &data, &lora_config, &weights_dir, callbacks)
            }
            Some(text_encoder_2) => {
                let pad_token_id_2 = SDXL_PAD_TOKEN_2;
                let models = SdxlTrainModels { unet, text_encoder, text_encoder_2, vae, pad_token_id_2 };
                easyphoto_lora::train_sdxl(models, &data, &lora_config, &weights_dir, callbacks)
            }
        };
        let failed = failure.borrow_mut().take();
        match (trained, failed) {
            (_, Some(e)) => return Err(e),
            (Err(easyphoto_lora::LoraError::Cancelled { .. }), None) => {
                return Err(PipelineError::Cancelled { stage: TRAIN_STAGE.into() });
            }
            (Err(e), None) => return Err(e.into()),
            (Ok(_), None) => {}
        }
    }
    let checkpoints = fuse::checkpoints(&weights_dir)?;
    // A resumed run validates the checkpoints written before it was stopped.
    for (step, path) in &checkpoints {
        if templates.iter().enumerate().any(|(k, _)| !store.validation_image(id, *step, k).is_file()) {
            validation::validate_checkpoint(
                store, id, &frozen, path, *step, &templates, config, info.seed, observer, cancel,
            )?;
        }
    }

    // 5. Face-identity score of every validation image against the training faces.
    let images: Vec<(u32, usize, PathBuf)> = checkpoints
        .iter()
        .flat_map(|(step, _)| (0..templates.len()).map(move |k| (*step, k, store.validation_image(id, *step, k))))
        .collect();
    let scores = face_id_score::score_validation(
        &crops,
        &images,
        components.detector.as_ref(),
        components.embedder.as_ref(),
        observer,
        cancel,
    )?;

    // 6. The final LoRA and the best face image.
    let fused = fuse::fuse(store, id, &checkpoints, &scores, &crops, config.top_merge as usize)?;
    info.fused_steps = fused.steps;
    info.best_face_score = fused.best_score;
    store.write_info(id, &info)?;
    Ok(TrainOutcome { info, lora: store.lora_path(id), best_face: store.best_face_image(id), scores })
}

/// The trainer's recipe from the flow's parameters (EasyPhoto's names).
fn lora_config(config: &TrainConfig, info: &UserInfo) -> easyphoto_lora::TrainConfig {
    easyphoto_lora::TrainConfig {
        rank: config.rank as usize,
        network_alpha: config.network_alpha as f32,
        unet_lr: config.learning_rate,
        text_encoder_lr: config.learning_rate / 2.0,
        train_batch_size: config.train_batch_size as usize,
        gradient_accumulation_steps: config.gradient_accumulation_steps as usize,
        max_train_steps: Some(info.max_train_steps as usize),
        checkpointing_steps: config.val_and_checkpointing_steps as usize,
        resolution: config.resolution,
        seed: info.seed,
        ..easyphoto_lora::TrainConfig::default()
    }
}
