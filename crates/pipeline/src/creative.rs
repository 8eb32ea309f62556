//! EasyPhoto's template-free "creative" path with an SDXL user LoRA: one SDXL txt2img per image,
//! the user's LoRA attached, each result scored against the user's reference photo.
//!
//! What EasyPhoto does (anatomy §2.1, §2.5): its SDXL-beta Text2Photo (PR #125) samples an SDXL
//! checkpoint (`SDXL_1.0_ArienMixXL_v2.0.safetensors`) with diffusers' default
//! `DPMSolverMultistepScheduler` (DPM++ 2M), 30 steps, CFG 7, 768 × 1344 (portrait), a prompt
//! ending in `DEFAULT_POSITIVE_XL` and the negative `DEFAULT_NEGATIVE_XL`; a user with an SDXL
//! LoRA is prompted `easyphoto_face, easyphoto, 1person, <lora:{id}>, {additional}` (weight 1, no
//! FilmVelvia3 style LoRA). EasyPhoto then feeds the generated image as a template to its
//! Photo2Photo flow (face fusion, SDXL ControlNet inpainting, colour shift). Here the image is
//! the result: this path has no template, and the SDXL ControlNets and face fusion are not part
//! of this build, so there is no post-processing (said in the README).
//!
//! The LoRA is the user's final LoRA (`<root>/users/<id>/…/<id>.safetensors`) or a file named
//! by the caller; a LoRA for another family (a SD1.5 face LoRA given to SDXL) is refused with
//! [`LoraError::WrongBase`] before sampling.
//!
//! Results are written atomically as `<output>/<id>-<seed>.png`, with `<id>-<seed>.json`
//! holding the prompt, the seed and the display score (EasyPhoto's `display_score`: the
//! identity score of the result's face against the face of `ref_image.jpg`; `null` when either
//! has no face).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use easyphoto_diffusion::schedulers::Sampler;
use easyphoto_diffusion::{DiffusionError, ModelFamily, StableDiffusion, Txt2Img, VisitLayers};
use easyphoto_face::{FaceDetector, FaceEmbedder};
use easyphoto_lora::{BaseFamily, KohyaLora, KohyaPrefix, LoraError, Targets, attach, detach, load_lora, lora_family};
use serde::{Deserialize, Serialize};

use crate::config::VALIDATION_PROMPT;
use crate::error::{PipelineError, Result};
use crate::progress::{CancelToken, Observer, Progress};
use crate::train::face_id_score::{face_embedding, identity_score};
use crate::train::validation::to_rgb;
use crate::user::{UserId, UserStore, write_atomic};

/// Progress stage of the sampling (one step per sampler step).
pub const STAGE: &str = "creative";

/// EasyPhoto's `DEFAULT_POSITIVE_XL` (WebUI HEAD `easyphoto_config.py`).
pub const DEFAULT_POSITIVE_XL: &str = "film photography, a clear face, minor acne, (high resolution detail of human skin texture:1.4, rough skin:1.2), (portrait, :1.8), (indirect lighting)";

/// EasyPhoto's `DEFAULT_NEGATIVE_XL` (WebUI HEAD `easyphoto_config.py`).
pub const DEFAULT_NEGATIVE_XL: &str = "(bokeh:2), cgi, illustration, cartoon, deformed, distorted, disfigured, poorly drawn, bad anatomy, wrong anatomy,ugly, deformed, blurry,Noisy, log, text";

/// Creative (SDXL txt2img) parameters, with EasyPhoto's names and SDXL-beta defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreativeConfig {
    /// The SDXL checkpoint (file name under the base checkpoints' folder, or a path).
    pub sd_model_checkpoint: String,
    /// What to paint (EasyPhoto's Text2Photo prompt); the user's tags are added to it.
    pub text_to_image_input_prompt: String,
    pub additional_prompt: String,
    pub additional_neg_prompt: String,
    /// Weight of the user's LoRA (EasyPhoto's SDXL prompt `<lora:{id}>`: 1).
    pub lora_weights: f64,
    pub text_to_image_width: u32,
    pub text_to_image_height: u32,
    pub diffusion_steps: u32,
    pub cfg_scale: f64,
    /// An A1111 sampler name.
    pub sampler_name: String,
    /// -1 draws a random seed per image, as EasyPhoto does; otherwise image `k` uses `seed + k`.
    pub seed: i64,
    pub batch_size: u32,
    pub default_positive_prompt: String,
    pub default_negative_prompt: String,
}

impl Default for CreativeConfig {
    fn default() -> Self {
        Self {
            sd_model_checkpoint: "SDXL_1.0_ArienMixXL_v2.0.safetensors".into(),
            text_to_image_input_prompt: String::new(),
            additional_prompt: String::new(),
            additional_neg_prompt: String::new(),
            lora_weights: 1.0,
            text_to_image_width: 768,
            text_to_image_height: 1344,
            diffusion_steps: 30,
            cfg_scale: 7.0,
            sampler_name: "DPM++ 2M".into(),
            seed: -1,
            batch_size: 1,
            default_positive_prompt: DEFAULT_POSITIVE_XL.into(),
            default_negative_prompt: DEFAULT_NEGATIVE_XL.into(),
        }
    }
}

/// `parts` joined with `", "`, empty ones left out.
fn join(parts: &[&str]) -> String {
    parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).collect::<Vec<_>>().join(", ")
}

impl CreativeConfig {
    /// `{text_to_image_input_prompt}, look at viewer, easyphoto_face, easyphoto, 1person,
    /// <lora:{id}:{w}>, {additional_prompt}, {DEFAULT_POSITIVE_XL}` (empty parts left out):
    /// EasyPhoto's Text2Photo prompt with its SDXL user tag.
    pub fn prompt(&self, user_id: &str) -> String {
        let lora = format!("<lora:{user_id}:{}>", self.lora_weights);
        join(&[
            &self.text_to_image_input_prompt,
            "look at viewer",
            VALIDATION_PROMPT,
            &lora,
            &self.additional_prompt,
            &self.default_positive_prompt,
        ])
    }

    /// `{additional_neg_prompt}, {DEFAULT_NEGATIVE_XL}`.
    pub fn negative_prompt(&self) -> String {
        join(&[&self.additional_neg_prompt, &self.default_negative_prompt])
    }

    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| PipelineError::InvalidParameter { field: field.into(), reason };
        for (field, value) in [
            ("text_to_image_width", self.text_to_image_width),
            ("text_to_image_height", self.text_to_image_height),
            ("diffusion_steps", self.diffusion_steps),
            ("batch_size", self.batch_size),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        if !(self.cfg_scale.is_finite() && self.cfg_scale > 0.0) {
            return Err(invalid("cfg_scale", format!("{} is not a positive number", self.cfg_scale)));
        }
        if !(self.lora_weights.is_finite() && self.lora_weights >= 0.0) {
            return Err(invalid("lora_weights", format!("{} is not a number ≥ 0", self.lora_weights)));
        }
        if self.seed < -1 {
            return Err(invalid("seed", format!("{} is neither -1 (random) nor a seed ≥ 0", self.seed)));
        }
        self.sampler()?;
        Ok(())
    }

    fn sampler(&self) -> Result<Sampler> {
        self.sampler_name.parse().map_err(|e: DiffusionError| PipelineError::InvalidParameter {
            field: "sampler_name".into(),
            reason: e.to_string(),
        })
    }

    /// The seed of image `k` of the batch.
    fn seed_of(&self, k: u32) -> u64 {
        if self.seed >= 0 { self.seed as u64 + u64::from(k) } else { rand::random_range(0..65536) }
    }
}

/// Loads an SDXL checkpoint (single file or diffusers folder); other families are refused,
/// naming the file.
pub fn load_sdxl(path: &Path, dtype: DType, device: &Device) -> Result<StableDiffusion> {
    if !path.exists() {
        return Err(PipelineError::InvalidInput {
            path: path.to_path_buf(),
            reason: "sd_model_checkpoint: no such SDXL checkpoint file or diffusers folder".into(),
        });
    }
    let sd = StableDiffusion::load(path, 1, dtype, device)?;
    if sd.family != ModelFamily::Sdxl {
        return Err(PipelineError::InvalidInput {
            path: path.to_path_buf(),
            reason: format!("a {:?} checkpoint; the creative path samples SDXL", sd.family),
        });
    }
    Ok(sd)
}

/// Refuses a LoRA built for another family than SDXL: what [`lora_family`] reads (shapes,
/// `ss_base_model_version`, `lora_te1_`/`lora_te2_`), else a single-encoder `lora_te_` prefix,
/// which only SD1.x/SD2.x LoRAs have.
pub fn check_sdxl_lora(lora: &KohyaLora) -> Result<()> {
    let single_encoder = || {
        let name = lora
            .modules()
            .map(|(n, _)| n)
            .find(|n| matches!(KohyaPrefix::split(n), Some((KohyaPrefix::TextEncoder, _))))?;
        Some((BaseFamily::Sd1, format!("it adapts a single text encoder (`{name}`), as SD1.x/SD2.x LoRAs do")))
    };
    match lora_family(lora).or_else(single_encoder) {
        Some((family, evidence)) if family != BaseFamily::Sdxl => {
            Err(LoraError::WrongBase { file: lora.file().to_string(), lora: family, model: BaseFamily::Sdxl, evidence }
                .into())
        }
        _ => Ok(()),
    }
}

/// The models of the creative path.
pub struct CreativeComponents {
    /// An SDXL model ([`load_sdxl`]).
    pub sd: StableDiffusion,
    pub detector: Box<dyn FaceDetector + Send + Sync>,
    pub embedder: Box<dyn FaceEmbedder + Send + Sync>,
}

/// One written result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Created {
    pub user_id: String,
    pub image: PathBuf,
    pub seed: u64,
    pub prompt: String,
    pub negative_prompt: String,
    /// The display score against `ref_image.jpg`; `None` when the result or the reference has no face.
    pub score: Option<f32>,
}

/// Paints user `id` `batch_size` times into `output_dir`. `lora` names the SDXL LoRA file; by
/// default the user's final LoRA. The user must have a reference photo and that LoRA.
#[allow(clippy::too_many_arguments)]
pub fn create(
    store: &UserStore,
    id: &UserId,
    lora: Option<&Path>,
    components: &mut CreativeComponents,
    config: &CreativeConfig,
    output_dir: &Path,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<Vec<Created>> {
    config.validate()?;
    let reference_path = store.reference_image(id);
    let lora_path = lora.map_or_else(|| store.lora_path(id), Path::to_path_buf);
    for path in [&reference_path, &lora_path] {
        if !path.is_file() {
            return Err(PipelineError::UserNotReady { id: id.to_string(), missing: path.clone() });
        }
    }
    if components.sd.family != ModelFamily::Sdxl {
        return Err(PipelineError::InvalidParameter {
            field: "sd_model_checkpoint".into(),
            reason: format!("the creative path samples SDXL, the model given is {:?}", components.sd.family),
        });
    }
    let user_lora = load_lora(&lora_path, components.sd.unet.device())?;
    check_sdxl_lora(&user_lora)?;
    let reference = easyphoto_face::load_rgb(&reference_path)?;
    let reference = face_embedding(&reference, components.detector.as_ref(), components.embedder.as_ref())?;

    attach_user_lora(&mut components.sd, Some((&user_lora, config.lora_weights)))?;
    let results = (0..config.batch_size)
        .map(|k| {
            create_one(id, components, config, config.seed_of(k), reference.as_deref(), output_dir, observer, cancel)
        })
        .collect::<Result<Vec<_>>>();
    attach_user_lora(&mut components.sd, None)?;
    results
}

/// Attaches `lora` to the UNet and both text encoders, or (`None`) detaches every LoRA.
fn attach_user_lora(sd: &mut StableDiffusion, lora: Option<(&KohyaLora, f64)>) -> Result<()> {
    let mut encoders = sd.text_encoders.encoders_mut();
    let (te1, te2) = (encoders.next(), encoders.next());
    let mut targets = Targets {
        unet: Some(&mut sd.unet),
        text_encoder: te1.map(|e| e as &mut dyn VisitLayers),
        text_encoder_2: te2.map(|e| e as &mut dyn VisitLayers),
    };
    match lora {
        Some((lora, weight)) => {
            let reports = match attach(&mut targets, &[(lora, weight)]) {
                Ok(reports) => reports,
                Err(e) => {
                    detach(&mut targets);
                    return Err(e.into());
                }
            };
            if let Err(e) = reports.iter().try_for_each(|r| r.ensure_complete()) {
                detach(&mut targets);
                return Err(e.into());
            }
        }
        None => detach(&mut targets),
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn create_one(
    id: &UserId,
    components: &CreativeComponents,
    config: &CreativeConfig,
    seed: u64,
    reference: Option<&[f32]>,
    output_dir: &Path,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<Created> {
    let request = Txt2Img {
        prompt: config.prompt(id.as_str()),
        negative_prompt: config.negative_prompt(),
        width: config.text_to_image_width as usize,
        height: config.text_to_image_height as usize,
        steps: config.diffusion_steps as usize,
        guidance_scale: config.cfg_scale,
        sampler: config.sampler()?,
        seed,
    };
    let message = format!("{id} seed {seed}");
    let mut on_step = |p: &easyphoto_diffusion::sampling::Progress| {
        observer.progress(Progress {
            stage: STAGE,
            step: p.step as u64,
            total: Some(p.total as u64),
            message: &message,
        });
        if cancel.is_cancelled() {
            easyphoto_diffusion::sampling::Flow::Cancel
        } else {
            easyphoto_diffusion::sampling::Flow::Continue
        }
    };
    let image = match components.sd.txt2img(&request, &mut on_step) {
        Ok((image, _)) => image,
        Err(DiffusionError::Cancelled { .. }) => return Err(PipelineError::Cancelled { stage: STAGE.into() }),
        Err(e) => return Err(e.into()),
    };
    let rgb =
        to_rgb(&image).map_err(|source| PipelineError::Tensor { stage: STAGE.into(), source: Box::new(source) })?;
    let score = match (reference, face_embedding(&rgb, components.detector.as_ref(), components.embedder.as_ref())?) {
        (Some(reference), Some(face)) => identity_score(&face, &[reference.to_vec()]),
        _ => None,
    };

    let stem = format!("{id}-{seed}");
    let image_path = output_dir.join(format!("{stem}.png"));
    let mut png = Vec::new();
    rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| PipelineError::Io { path: image_path.clone(), source: std::io::Error::other(e) })?;
    write_atomic(&image_path, &png)?;
    let created = Created {
        user_id: id.to_string(),
        image: image_path,
        seed,
        prompt: request.prompt,
        negative_prompt: request.negative_prompt,
        score,
    };
    let json_path = output_dir.join(format!("{stem}.json"));
    let json = serde_json::to_vec_pretty(&created)
        .map_err(|source| PipelineError::Json { path: json_path.clone(), source })?;
    write_atomic(&json_path, &json)?;
    Ok(created)
}
