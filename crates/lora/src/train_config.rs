//! The training configuration, with EasyPhoto's recipe as the default (`train_lora.py` /
//! `easyphoto_train.py` arguments). Every field can be overridden (serde, the reference's names).

use easyphoto_diffusion::schedulers::{BetaSchedule, DdpmConfig, PredictionType};
use serde::{Deserialize, Serialize};

use crate::LoraError;
use crate::adamw::AdamWConfig;

/// How a face LoRA is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// LoRA rank (`network_dim`): 128 (SDXL: 32).
    pub rank: usize,
    /// `network_alpha`: 64 (SDXL: 16); the scale is alpha / rank.
    pub network_alpha: f32,
    /// Learning rate of the UNet modules: 1e-4.
    pub unet_lr: f64,
    /// Learning rate of the text-encoder modules: lr / 2 = 5e-5.
    pub text_encoder_lr: f64,
    /// AdamW hyper-parameters.
    #[serde(flatten)]
    pub adam: AdamWConfig,
    /// Gradient-norm clipping: 1.0.
    pub max_grad_norm: f64,
    /// Only `"constant"` (EasyPhoto's, no warm-up) is implemented.
    pub lr_scheduler: String,
    /// Images per micro-batch: 1.
    pub train_batch_size: usize,
    /// Micro-batches per optimizer step: 4.
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps; `None` means `min(photos · steps_per_photo, max_steps_cap)`.
    pub max_train_steps: Option<usize>,
    /// 200 steps per photo...
    pub steps_per_photo: usize,
    /// ...at most 800.
    pub max_steps_cap: usize,
    /// A checkpoint every this many optimizer steps (and after the last): 100.
    pub checkpointing_steps: usize,
    /// Training resolution: 512 (SDXL: 1024).
    pub resolution: u32,
    /// Centre crop instead of EasyPhoto's random crop.
    pub center_crop: bool,
    /// Random horizontal flip: on.
    pub random_flip: bool,
    /// Train text-encoder LoRA modules too (EasyPhoto's face LoRAs: yes; SDXL: no).
    pub train_text_encoder: bool,
    /// Seed of every random choice (init, data order, crops, flips, noise, timesteps).
    pub seed: u64,
    /// The noise schedule (SD1.5's `DDPMScheduler`: scaled_linear 0.00085..0.012, 1000 steps);
    /// its `prediction_type` chooses the target (epsilon or v).
    pub noise_scheduler: DdpmConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            rank: 128,
            network_alpha: 64.0,
            unet_lr: 1e-4,
            text_encoder_lr: 5e-5,
            adam: AdamWConfig::default(),
            max_grad_norm: 1.0,
            lr_scheduler: "constant".into(),
            train_batch_size: 1,
            gradient_accumulation_steps: 4,
            max_train_steps: None,
            steps_per_photo: 200,
            max_steps_cap: 800,
            checkpointing_steps: 100,
            resolution: 512,
            center_crop: false,
            random_flip: true,
            train_text_encoder: true,
            seed: 42,
            noise_scheduler: DdpmConfig {
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: BetaSchedule::ScaledLinear,
                clip_sample: false,
                steps_offset: 1,
                prediction_type: PredictionType::Epsilon,
                ..DdpmConfig::default()
            },
        }
    }
}

impl TrainConfig {
    /// EasyPhoto's SDXL settings: rank 32, alpha 16, 1024², 600 steps, no text-encoder training.
    pub fn sdxl() -> Self {
        Self {
            rank: 32,
            network_alpha: 16.0,
            resolution: 1024,
            max_train_steps: Some(600),
            train_text_encoder: false,
            ..Self::default()
        }
    }

    /// The number of optimizer steps for `photos` training photos.
    pub fn steps_for(&self, photos: usize) -> usize {
        self.max_train_steps.unwrap_or((photos * self.steps_per_photo).min(self.max_steps_cap))
    }

    /// Refuses values the trainer cannot use.
    pub fn validate(&self) -> Result<(), LoraError> {
        let bad = |field: &str, reason: &str| Err(LoraError::Config { field: field.into(), reason: reason.into() });
        if self.rank == 0 {
            return bad("rank", "must be at least 1");
        }
        if self.lr_scheduler != "constant" {
            return bad("lr_scheduler", "only \"constant\" is implemented");
        }
        if self.train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad("train_batch_size", "batch size and gradient_accumulation_steps must be at least 1");
        }
        if self.checkpointing_steps == 0 {
            return bad("checkpointing_steps", "must be at least 1");
        }
        if self.resolution == 0 || !self.resolution.is_multiple_of(8) {
            return bad("resolution", "must be a positive multiple of 8");
        }
        if self.noise_scheduler.prediction_type == PredictionType::Sample {
            return bad("noise_scheduler.prediction_type", "only epsilon and v_prediction are trained");
        }
        Ok(())
    }
}
