//! The parameters of the two flows, with EasyPhoto's names and defaults (WebUI HEAD `6c1f895`:
//! `easyphoto_ui.py`, `api.py`, `easyphoto_config.py`, `train_kohya/train_lora.py`).
//!
//! A config is built from the defaults, then a TOML or JSON file, then `name=value` overrides
//! (the CLI's `--set`), in that order. Unknown names are refused with a typed error naming the
//! field, as are values of the wrong type; [`TrainConfig::validate`] and
//! [`InferConfig::validate`] then check ranges.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};

/// The fixed caption of every training image, and the start of every inference prompt
/// (EasyPhoto's `validation_prompt`).
pub const VALIDATION_PROMPT: &str = "easyphoto_face, easyphoto, 1person";

/// EasyPhoto's `DEFAULT_POSITIVE`, appended to every inference prompt.
pub const DEFAULT_POSITIVE: &str = "(cloth:1.5), (best quality), (realistic, photo-realistic:1.3), (beautiful eyes:1.3), (sparkling eyes:1.3), (beautiful mouth:1.3), finely detail, light smile, extremely detailed CG unity 8k wallpaper, huge filesize, best quality, realistic, photo-realistic, ultra high res, raw photo, put on makeup";

/// EasyPhoto's `DEFAULT_NEGATIVE`, appended to every inference negative prompt.
pub const DEFAULT_NEGATIVE: &str = "(bags under the eyes:1.5), (bags under eyes:1.5), (earrings:1.3), (glasses:1.2), (naked:1.5), (nsfw:1.5), nude, breasts, penis, cum, (over red lips: 1.3), (bad lips: 1.3), (bad ears:1.3), (bad hair: 1.3), (bad teeth: 1.3), (worst quality:2), (low quality:2), (normal quality:2), lowres, watermark, badhand, lowres, bad anatomy, bad hands, normal quality, mural,";

/// The negative prompt of the validation images during training (`train_lora.py --neg_prompt`).
pub const VALIDATION_NEGATIVE: &str = "sketch, low quality, worst quality, low quality shadow, lowres, inaccurate eyes, huge eyes, longbody, bad anatomy, cropped, worst face, strange mouth, bad anatomy, inaccurate limb, bad composition, ugly, noface, disfigured, duplicate, ugly, text, logo";

/// The fewest photos training accepts (EasyPhoto asks for 5 to 20 and has no hard check).
pub const MIN_TRAIN_PHOTOS: usize = 5;

/// Face LoRA training (EasyPhoto's train API fields; the WebUI defaults where the API differs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The base checkpoint, SD1.5 or SDXL (file name under the models directory, or a path).
    pub sd_model_checkpoint: String,
    pub resolution: u32,
    /// Save a checkpoint and run validation every this many steps (and after the last step).
    pub val_and_checkpointing_steps: u32,
    /// Steps = min(photos × `steps_per_photos`, `max_train_steps`) ([`TrainConfig::train_steps`]).
    pub max_train_steps: u32,
    pub steps_per_photos: u32,
    pub train_batch_size: u32,
    pub gradient_accumulation_steps: u32,
    /// UNet learning rate; the text encoder trains at half of it.
    pub learning_rate: f64,
    pub rank: u32,
    pub network_alpha: u32,
    pub validation: bool,
    /// Skin retouching of the training crops (WebUI default on; the API's default is off).
    pub skin_retouching_bool: bool,
    /// The face box is widened to this many face sizes before cropping.
    pub crop_ratio: f64,
    /// -1 draws a random seed, as EasyPhoto does.
    pub seed: i64,
    /// Caption of every training image and prompt of the validation images.
    pub validation_prompt: String,
    /// Negative prompt of the validation images.
    pub neg_prompt: String,
    /// CFG of the validation images.
    pub guidance_scale: f64,
    /// Validation inpainting: sampler steps and strength (hard-coded 20 / 0.65 in EasyPhoto).
    pub validation_inference_steps: u32,
    pub validation_strength: f64,
    /// Validation inpaints the face box widened by this ratio (1.3 in EasyPhoto).
    pub validation_mask_ratio: f64,
    /// Photos kept after identity ranking (15 in EasyPhoto).
    pub max_training_photos: u32,
    /// Validation images whose checkpoints are averaged into the final LoRA (EasyPhoto's `top_merge`).
    pub top_merge: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            sd_model_checkpoint: "Chilloutmix-Ni-pruned-fp16-fix.safetensors".into(),
            resolution: 512,
            val_and_checkpointing_steps: 100,
            max_train_steps: 800,
            steps_per_photos: 200,
            train_batch_size: 1,
            gradient_accumulation_steps: 4,
            learning_rate: 1e-4,
            rank: 128,
            network_alpha: 64,
            validation: true,
            skin_retouching_bool: true,
            crop_ratio: 3.0,
            seed: -1,
            validation_prompt: VALIDATION_PROMPT.into(),
            neg_prompt: VALIDATION_NEGATIVE.into(),
            guidance_scale: 9.0,
            validation_inference_steps: 20,
            validation_strength: 0.65,
            validation_mask_ratio: 1.3,
            max_training_photos: 15,
            top_merge: 10,
        }
    }
}

impl TrainConfig {
    /// EasyPhoto's step rule, min(photos × `steps_per_photos`, `max_train_steps`), over the photos
    /// kept for training (at most `max_training_photos`). EasyPhoto counts the uploads instead, so
    /// 20 uploads of which 15 are kept train as long as 20 would; we count what is trained on.
    pub fn train_steps(&self, photos: usize) -> u32 {
        let kept = photos.min(self.max_training_photos as usize) as u64;
        let per_photos = kept.saturating_mul(self.steps_per_photos as u64);
        per_photos.min(self.max_train_steps as u64) as u32
    }

    /// Range checks, including EasyPhoto's `rank >= network_alpha`.
    pub fn validate(&self) -> Result<()> {
        positive("resolution", self.resolution)?;
        if !self.resolution.is_multiple_of(8) {
            return Err(invalid("resolution", format!("{} is not a multiple of 8", self.resolution)));
        }
        for (field, value) in [
            ("val_and_checkpointing_steps", self.val_and_checkpointing_steps),
            ("max_train_steps", self.max_train_steps),
            ("steps_per_photos", self.steps_per_photos),
            ("train_batch_size", self.train_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("rank", self.rank),
            ("network_alpha", self.network_alpha),
            ("validation_inference_steps", self.validation_inference_steps),
            ("max_training_photos", self.max_training_photos),
            ("top_merge", self.top_merge),
        ] {
            positive(field, value)?;
        }
        if self.rank < self.network_alpha {
            return Err(invalid("network_alpha", format!("{} is larger than rank {}", self.network_alpha, self.rank)));
        }
        finite_above("learning_rate", self.learning_rate, 0.0)?;
        finite_above("guidance_scale", self.guidance_scale, 0.0)?;
        unit_interval("validation_strength", self.validation_strength, false)?;
        at_least("crop_ratio", self.crop_ratio, 1.0)?;
        at_least("validation_mask_ratio", self.validation_mask_ratio, 1.0)?;
        seed("seed", self.seed)
    }
}

/// Portrait inference (EasyPhoto's WebUI defaults, anatomy §2.0; the API differs on the
/// fusion ratios, 0.5, and the second denoising strength, 0.35).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferConfig {
    pub sd_model_checkpoint: String,
    pub additional_prompt: String,
    pub additional_neg_prompt: String,
    /// Weight of the user's LoRA in the prompt.
    pub lora_weights: f64,
    /// The style LoRA EasyPhoto adds to every prompt, and its weight.
    pub style_lora: String,
    pub style_lora_weight: f64,
    pub first_diffusion_steps: u32,
    pub first_denoising_strength: f64,
    pub second_diffusion_steps: u32,
    pub second_denoising_strength: f64,
    pub cfg_scale: f64,
    /// An A1111 sampler name.
    pub sampler_name: String,
    /// Gaussian blur of the inpainting masks (A1111's `mask_blur`).
    pub mask_blur: u32,
    /// ControlNet weights of the first diffusion ("My prompt is more important" mode).
    pub first_canny_weight: f64,
    pub first_openpose_weight: f64,
    pub first_color_weight: f64,
    /// ControlNet weights of the second diffusion.
    pub second_canny_weight: f64,
    pub second_tile_weight: f64,
    /// The seam pass of multi-person templates (EasyPhoto's third diffusion: 30 steps × 0.3 over
    /// a ring around the repainted faces, canny 1.0 + colour 1.0, the additional prompt only).
    pub seam_diffusion_steps: u32,
    pub seam_denoising_strength: f64,
    /// -1 draws a random seed per template, as EasyPhoto does.
    pub seed: i64,
    pub batch_size: u32,
    pub crop_face_preprocess: bool,
    pub apply_face_fusion_before: bool,
    pub apply_face_fusion_after: bool,
    pub before_face_fusion_ratio: f64,
    pub after_face_fusion_ratio: f64,
    pub color_shift_middle: bool,
    pub color_shift_last: bool,
    pub enable_second_diffusion: bool,
    pub display_score: bool,
    /// Appended to the prompt / negative prompt (EasyPhoto's `DEFAULT_POSITIVE` / `DEFAULT_NEGATIVE`).
    pub default_positive_prompt: String,
    pub default_negative_prompt: String,
    /// The face crop is resized to this short side, both sides floored to multiples of 32 (512 in
    /// EasyPhoto; a smaller value makes tiny test runs fast). The seam pass's limit (768, or 512
    /// for elongated squares) scales with it.
    pub short_side: u32,
}

impl Default for InferConfig {
    fn default() -> Self {
        Self {
            sd_model_checkpoint: "Chilloutmix-Ni-pruned-fp16-fix.safetensors".into(),
            additional_prompt: "masterpiece, beauty".into(),
            additional_neg_prompt: String::new(),
            lora_weights: 0.9,
            style_lora: "FilmVelvia3".into(),
            style_lora_weight: 0.65,
            first_diffusion_steps: 50,
            first_denoising_strength: 0.45,
            second_diffusion_steps: 20,
            second_denoising_strength: 0.30,
            cfg_scale: 7.0,
            sampler_name: "DPM++ 2M SDE Karras".into(),
            mask_blur: 8,
            first_canny_weight: 0.50,
            first_openpose_weight: 0.50,
            first_color_weight: 0.85,
            second_canny_weight: 1.0,
            second_tile_weight: 1.0,
            seam_diffusion_steps: 30,
            seam_denoising_strength: 0.3,
            seed: -1,
            batch_size: 1,
            crop_face_preprocess: true,
            apply_face_fusion_before: true,
            apply_face_fusion_after: true,
            before_face_fusion_ratio: 0.60,
            after_face_fusion_ratio: 0.60,
            color_shift_middle: true,
            color_shift_last: true,
            enable_second_diffusion: true,
            display_score: false,
            default_positive_prompt: DEFAULT_POSITIVE.into(),
            default_negative_prompt: DEFAULT_NEGATIVE.into(),
            short_side: 512,
        }
    }
}

impl InferConfig {
    /// The positive prompt for `user_id`, as EasyPhoto builds it:
    /// `{validation_prompt}, <lora:{id}:{w}>, <lora:FilmVelvia3:0.65>, {additional}, {DEFAULT_POSITIVE}`.
    pub fn prompt(&self, user_id: &str) -> String {
        format!(
            "{VALIDATION_PROMPT}, <lora:{user_id}:{}>, <lora:{}:{}>, {}, {}",
            self.lora_weights,
            self.style_lora,
            self.style_lora_weight,
            self.additional_prompt,
            self.default_positive_prompt
        )
    }

    /// `{additional_neg_prompt}, {DEFAULT_NEGATIVE}`.
    pub fn negative_prompt(&self) -> String {
        format!("{}, {}", self.additional_neg_prompt, self.default_negative_prompt)
    }

    pub fn validate(&self) -> Result<()> {
        positive("first_diffusion_steps", self.first_diffusion_steps)?;
        positive("second_diffusion_steps", self.second_diffusion_steps)?;
        positive("seam_diffusion_steps", self.seam_diffusion_steps)?;
        positive("batch_size", self.batch_size)?;
        if self.short_side < 32 || !self.short_side.is_multiple_of(32) {
            return Err(invalid("short_side", format!("{} is not a positive multiple of 32", self.short_side)));
        }
        unit_interval("first_denoising_strength", self.first_denoising_strength, false)?;
        unit_interval("second_denoising_strength", self.second_denoising_strength, false)?;
        unit_interval("seam_denoising_strength", self.seam_denoising_strength, false)?;
        unit_interval("before_face_fusion_ratio", self.before_face_fusion_ratio, true)?;
        unit_interval("after_face_fusion_ratio", self.after_face_fusion_ratio, true)?;
        finite_above("cfg_scale", self.cfg_scale, 0.0)?;
        for (field, value) in [
            ("lora_weights", self.lora_weights),
            ("style_lora_weight", self.style_lora_weight),
            ("first_canny_weight", self.first_canny_weight),
            ("first_openpose_weight", self.first_openpose_weight),
            ("first_color_weight", self.first_color_weight),
            ("second_canny_weight", self.second_canny_weight),
            ("second_tile_weight", self.second_tile_weight),
        ] {
            at_least(field, value, 0.0)?;
        }
        self.sampler_name
            .parse::<easyphoto_diffusion::schedulers::Sampler>()
            .map_err(|e| invalid("sampler_name", e.to_string()))?;
        seed("seed", self.seed)
    }
}

/// Builds a config: defaults, then `file` (`.toml` or `.json`), then `overrides` (`name=value`,
/// the value read as TOML — `30`, `0.5`, `true` — or as text for text fields).
pub fn load_config<T: Serialize + DeserializeOwned + Default>(file: Option<&Path>, overrides: &[String]) -> Result<T> {
    let defaults = toml::Table::try_from(T::default())
        .map_err(|e| PipelineError::InvalidConfig { file: "(defaults)".into(), message: e.to_string() })?;
    let mut merged = defaults.clone();
    let mut origin = "(defaults)".to_string();
    if let Some(path) = file {
        origin = path.display().to_string();
        for (key, value) in read_table(path)? {
            set_field(&defaults, &mut merged, &origin, &key, value)?;
        }
    }
    for item in overrides {
        let (key, text) = item.split_once('=').ok_or_else(|| PipelineError::InvalidConfig {
            file: "--set".into(),
            message: format!("{item:?} is not of the form name=value"),
        })?;
        let key = key.trim();
        let value = match defaults.get(key) {
            Some(toml::Value::String(_)) => toml::Value::String(text.to_string()),
            _ => parse_toml_value(text.trim()),
        };
        set_field(&defaults, &mut merged, "--set", key, value)?;
        origin = format!("{origin} + --set");
    }
    T::deserialize(toml::Value::Table(merged))
        .map_err(|e| PipelineError::InvalidConfig { file: origin, message: e.to_string() })
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).map_err(|source| PipelineError::Read { path: path.to_path_buf(), source })?;
    let file = path.display().to_string();
    let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let value: toml::Value = if is_json {
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| PipelineError::Json { path: path.to_path_buf(), source })?;
        toml::Value::deserialize(json)
            .map_err(|e| PipelineError::InvalidConfig { file: file.clone(), message: e.to_string() })?
    } else {
        toml::Value::Table(
            toml::from_str(&text)
                .map_err(|e| PipelineError::InvalidConfig { file: file.clone(), message: e.to_string() })?,
        )
    };
    match value {
        toml::Value::Table(table) => Ok(table),
        other => Err(PipelineError::InvalidConfig {
            file,
            message: format!("expected a table of fields, found {}", other.type_str()),
        }),
    }
}

/// Sets `key` in `merged` after checking that it is a known field and that `value` has the type
/// of its default (an integer is accepted where a float is expected).
fn set_field(
    defaults: &toml::Table,
    merged: &mut toml::Table,
    file: &str,
    key: &str,
    value: toml::Value,
) -> Result<()> {
    let Some(default) = defaults.get(key) else {
        let known: Vec<&str> = defaults.keys().map(String::as_str).collect();
        return Err(PipelineError::UnknownConfigField {
            file: file.into(),
            field: key.into(),
            known: known.join(", "),
        });
    };
    let value = match (default, value) {
        (toml::Value::Float(_), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (d, v) if std::mem::discriminant(d) == std::mem::discriminant(&v) => v,
        (d, v) => {
            return Err(PipelineError::InvalidConfig {
                file: file.into(),
                message: format!("`{key}` must be {}, found {} {v}", article(d.type_str()), v.type_str()),
            });
        }
    };
    merged.insert(key.to_string(), value);
    Ok(())
}

/// A TOML value (`30`, `0.5`, `true`, `"x"`), or the text itself when it is not one.
fn parse_toml_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn article(type_str: &str) -> String {
    match type_str {
        "integer" => "an integer".into(),
        other => format!("a {other}"),
    }
}

fn invalid(field: &str, reason: String) -> PipelineError {
    PipelineError::InvalidParameter { field: field.into(), reason }
}

fn positive(field: &str, value: u32) -> Result<()> {
    if value == 0 {
        return Err(invalid(field, "must be at least 1".into()));
    }
    Ok(())
}

fn finite_above(field: &str, value: f64, min: f64) -> Result<()> {
    if !value.is_finite() || value <= min {
        return Err(invalid(field, format!("{value} must be a number above {min}")));
    }
    Ok(())
}

fn at_least(field: &str, value: f64, min: f64) -> Result<()> {
    if !value.is_finite() || value < min {
        return Err(invalid(field, format!("{value} must be a number of at least {min}")));
    }
    Ok(())
}

/// (0, 1], or [0, 1] with `zero_ok`.
fn unit_interval(field: &str, value: f64, zero_ok: bool) -> Result<()> {
    let low_ok = if zero_ok { value >= 0.0 } else { value > 0.0 };
    if !(low_ok && value <= 1.0) {
        let low = if zero_ok { "[0" } else { "(0" };
        return Err(invalid(field, format!("{value} is outside {low}, 1]")));
    }
    Ok(())
}

fn seed(field: &str, value: i64) -> Result<()> {
    if value < -1 {
        return Err(invalid(field, format!("{value}: use -1 for a random seed, or a seed ≥ 0")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_easyphotos() {
        let t = TrainConfig::default();
        assert_eq!((t.resolution, t.rank, t.network_alpha, t.learning_rate), (512, 128, 64, 1e-4));
        assert_eq!((t.val_and_checkpointing_steps, t.gradient_accumulation_steps, t.top_merge), (100, 4, 10));
        assert_eq!(t.train_steps(3), 600);
        assert_eq!(t.train_steps(5), 800);
        assert_eq!(t.train_steps(20), 800);
        let long = TrainConfig { max_train_steps: 10_000, ..TrainConfig::default() };
        assert_eq!(long.train_steps(20), 15 * 200, "only the 15 kept photos count");
        t.validate().unwrap();
        let i = InferConfig::default();
        assert_eq!((i.first_diffusion_steps, i.first_denoising_strength), (50, 0.45));
        assert_eq!((i.second_diffusion_steps, i.second_denoising_strength), (20, 0.30));
        assert_eq!((i.cfg_scale, i.sampler_name.as_str()), (7.0, "DPM++ 2M SDE Karras"));
        assert_eq!((i.first_canny_weight, i.first_openpose_weight, i.first_color_weight), (0.5, 0.5, 0.85));
        assert_eq!((i.second_canny_weight, i.second_tile_weight), (1.0, 1.0));
        assert_eq!((i.before_face_fusion_ratio, i.after_face_fusion_ratio, i.lora_weights), (0.6, 0.6, 0.9));
        i.validate().unwrap();
    }

    #[test]
    fn prompts_are_built_as_easyphoto_builds_them() {
        let i = InferConfig::default();
        assert_eq!(
            i.prompt("王小明"),
            format!(
                "easyphoto_face, easyphoto, 1person, <lora:王小明:0.9>, <lora:FilmVelvia3:0.65>, masterpiece, beauty, {DEFAULT_POSITIVE}"
            )
        );
        assert_eq!(i.negative_prompt(), format!(", {DEFAULT_NEGATIVE}"));
        assert!(
            DEFAULT_POSITIVE.starts_with("(cloth:1.5), (best quality)") && DEFAULT_POSITIVE.ends_with("put on makeup")
        );
        assert!(DEFAULT_NEGATIVE.starts_with("(bags under the eyes:1.5)") && DEFAULT_NEGATIVE.ends_with("mural,"));
    }

    #[test]
    fn files_and_overrides_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("infer.toml");
        std::fs::write(&toml_path, "first_diffusion_steps = 30\ncfg_scale = 6\nadditional_prompt = \"studio\"\n")
            .unwrap();
        let c: InferConfig =
            load_config(Some(&toml_path), &["first_diffusion_steps=25".into(), "display_score=true".into()]).unwrap();
        assert_eq!((c.first_diffusion_steps, c.cfg_scale, c.display_score), (25, 6.0, true));
        assert_eq!(c.additional_prompt, "studio");
        assert_eq!(c.second_diffusion_steps, 20);

        let json_path = dir.path().join("train.json");
        std::fs::write(&json_path, r#"{"rank": 64, "network_alpha": 32, "learning_rate": 0.0002}"#).unwrap();
        let t: TrainConfig = load_config(Some(&json_path), &["validation_prompt=a, b".into()]).unwrap();
        assert_eq!((t.rank, t.network_alpha, t.learning_rate), (64, 32, 2e-4));
        assert_eq!(t.validation_prompt, "a, b");
    }

    #[test]
    fn unknown_fields_and_wrong_types_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "first_diffusion_step = 30\n").unwrap();
        match load_config::<InferConfig>(Some(&path), &[]) {
            Err(PipelineError::UnknownConfigField { field, file, known }) => {
                assert_eq!(field, "first_diffusion_step");
                assert!(file.ends_with("c.toml"));
                assert!(known.contains("first_diffusion_steps"));
            }
            other => panic!("{other:?}"),
        }
        match load_config::<TrainConfig>(None, &["enable_rl=true".into()]) {
            Err(PipelineError::UnknownConfigField { field, file, .. }) => {
                assert_eq!((field.as_str(), file.as_str()), ("enable_rl", "--set"))
            }
            other => panic!("{other:?}"),
        }
        let err = load_config::<InferConfig>(None, &["first_diffusion_steps=many".into()]).unwrap_err().to_string();
        assert!(err.contains("`first_diffusion_steps` must be an integer, found string"), "{err}");
        let err = load_config::<InferConfig>(None, &["first_diffusion_steps=-3".into()]).unwrap_err().to_string();
        assert!(err.contains("first_diffusion_steps") || err.contains("u32"), "{err}");
        let err = load_config::<InferConfig>(None, &["seed".into()]).unwrap_err().to_string();
        assert!(err.contains("name=value"), "{err}");
        std::fs::write(&path, "[nested]\nx = 1\n").unwrap();
        assert!(matches!(load_config::<InferConfig>(Some(&path), &[]), Err(PipelineError::UnknownConfigField { .. })));
        std::fs::write(&path, "cfg_scale = \n").unwrap();
        let err = load_config::<InferConfig>(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("c.toml"), "{err}");
    }

    #[test]
    fn ranges_are_checked_with_the_field_named() {
        for (set, field) in [
            ("network_alpha=256", "network_alpha"),
            ("resolution=500", "resolution"),
            ("learning_rate=0", "learning_rate"),
            ("validation_strength=1.5", "validation_strength"),
            ("seed=-2", "seed"),
        ] {
            let c: TrainConfig = load_config(None, &[set.into()]).unwrap();
            match c.validate() {
                Err(PipelineError::InvalidParameter { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{set}: {other:?}"),
            }
        }
        for (set, field) in [
            ("first_denoising_strength=0", "first_denoising_strength"),
            ("after_face_fusion_ratio=1.2", "after_face_fusion_ratio"),
            ("sampler_name=DPM++ 3M", "sampler_name"),
            ("first_color_weight=-1", "first_color_weight"),
            ("batch_size=0", "batch_size"),
        ] {
            let c: InferConfig = load_config(None, &[set.into()]).unwrap();
            match c.validate() {
                Err(PipelineError::InvalidParameter { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{set}: {other:?}"),
            }
        }
    }
}
