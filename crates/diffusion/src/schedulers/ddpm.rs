//! DDPM (Ho et al. 2020), diffusers `DDPMScheduler`: ancestral sampling, and the forward process
//! and velocity target used for training.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::schedule::{BetaSchedule, PredictionType, TimestepSpacing, betas, exp32, ln32, train_timesteps};
use super::{
    NoiseSource, Scheduler, add_noise_alphas, add_noise_at_timestep, clip_sample, data_prediction, draw_noise, mul,
    per_item_alphas, refuse_flag, train_index, training_timesteps, upcast,
};
use crate::error::{DiffusionError, Result};

const CLASS: &str = "DDPMScheduler";

/// The variance of the noise added at each step (`variance_type`; the learned variants are not
/// implemented).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance `beta~_t`.
    FixedSmall,
    /// `beta~_t`, through its logarithm.
    FixedSmallLog,
    /// `beta_t`.
    FixedLarge,
}

/// `DDPMScheduler`'s `scheduler_config.json` (dynamic thresholding is not implemented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdpmConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// DDPM. Without `set_timesteps` it steps through every training timestep (`t -> t - 1`).
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: DdpmConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
}

impl DdpmScheduler {
    pub fn new(config: DdpmConfig) -> Result<Self> {
        refuse_flag(CLASS, "thresholding", config.thresholding, "dynamic thresholding")?;
        let alphas_cumprod = betas!(config).alphas_cumprod()?;
        let timesteps = train_timesteps(config.num_train_timesteps);
        Ok(Self { config, alphas_cumprod, timesteps, num_inference_steps: None })
    }

    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }

    /// diffusers' `alphas_cumprod` (float32): the signal fraction `alpha_bar_t` of each training
    /// timestep (for SNR loss weighting, `snr = ac / (1 - ac)`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The forward process with one training timestep per batch item (or one for all):
    /// `sqrt(ac[t]) * original + sqrt(1 - ac[t]) * noise`.
    pub fn add_noise_at(&self, original: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        add_noise_alphas(&self.alphas_cumprod, original, noise, timesteps)
    }

    /// The v-prediction training target `sqrt(ac[t]) * noise - sqrt(1 - ac[t]) * sample`, one
    /// training timestep per batch item (or one for all).
    pub fn get_velocity(&self, sample: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (sqrt_a, sqrt_b) = per_item_alphas(&self.alphas_cumprod, sample, timesteps)?;
        Ok((noise.broadcast_mul(&sqrt_a)? - sample.broadcast_mul(&sqrt_b)?)?)
    }

    /// The timestep after `t` in the schedule, -1 after the last (diffusers `previous_timestep`).
    fn previous_timestep(&self, t: usize) -> Result<i64> {
        if self.num_inference_steps.is_none() {
            return Ok(t as i64 - 1);
        }
        let i =
            self.timesteps.iter().position(|&s| s == t as f64).ok_or_else(|| {
                DiffusionError::input("timestep", format!("{t} is not one of the scheduler's timesteps"))
            })?;
        Ok(self.timesteps.get(i + 1).map_or(-1, |&s| s as i64))
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        self.timesteps =
            training_timesteps(c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset)?;
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// DDPM has no step counter: each step is found from its timestep.
    fn set_begin_index(&mut self, _index: usize) {}

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = train_index(timestep, self.config.num_train_timesteps)?;
        let prev_t = self.previous_timestep(t)?;
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { 1.0 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let (mo, x) = (upcast(model_output)?, upcast(sample)?);

        let c = &self.config;
        let pred_x0 = data_prediction(c.prediction_type, &mo, &x, alpha_prod_t.sqrt(), beta_prod_t.sqrt())?;
        let pred_x0 = clip_sample(pred_x0, c.clip_sample, c.clip_sample_range)?;
        let x0_coeff = (alpha_prod_t_prev.sqrt() * current_beta_t) / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev = (mul(&pred_x0, x0_coeff)? + mul(&x, sample_coeff)?)?;

        if t > 0 {
            let z = upcast(&draw_noise(noise, model_output)?)?;
            let variance = ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
            let std = match self.config.variance_type {
                VarianceType::FixedSmall => variance.sqrt(),
                VarianceType::FixedSmallLog => exp32(0.5 * ln32(variance)),
                VarianceType::FixedLarge => current_beta_t.sqrt(),
            };
            prev = (prev + mul(&z, std)?)?;
        }
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_at_timestep(&self.alphas_cumprod, original, noise, timestep)
    }
}
