//! DDIM (Song et al. 2020), diffusers `DDIMScheduler`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::schedule::{BetaSchedule, PredictionType, TimestepSpacing, betas, train_timesteps};
use super::{
    NoiseSource, Scheduler, add_noise_at_timestep, clip_sample, data_prediction, draw_noise, mul, noise_prediction,
    refuse_flag, train_index, training_timesteps, upcast,
};
use crate::error::{DiffusionError, Result};

const CLASS: &str = "DDIMScheduler";

/// `DDIMScheduler`'s `scheduler_config.json` (dynamic thresholding is not implemented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    /// Clamps the predicted `x0` to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// The last step denoises to `alphas_cumprod = 1` (else to `alphas_cumprod[0]`).
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

/// DDIM: deterministic for `eta = 0` (the default), DDPM-like ancestral sampling for `eta = 1`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    eta: f64,
}

impl DdimScheduler {
    pub fn new(config: DdimConfig) -> Result<Self> {
        refuse_flag(CLASS, "thresholding", config.thresholding, "dynamic thresholding")?;
        let alphas_cumprod = betas!(config).alphas_cumprod()?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let timesteps = train_timesteps(config.num_train_timesteps);
        Ok(Self { config, alphas_cumprod, final_alpha_cumprod, timesteps, num_inference_steps: None, eta: 0.0 })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// diffusers' `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The weight of the noise added at each step (the `eta` argument of diffusers' `step`):
    /// 0 is DDIM, 1 is DDPM.
    pub fn set_eta(&mut self, eta: f64) {
        self.eta = eta;
    }
}

impl Scheduler for DdimScheduler {
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

    /// DDIM has no step counter: each step is found from its timestep.
    fn set_begin_index(&mut self, _index: usize) {}

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self
            .num_inference_steps
            .ok_or_else(|| DiffusionError::input("num_inference_steps", "call set_timesteps before step"))?;
        let t = train_index(timestep, self.config.num_train_timesteps)?;
        let prev_t = t as i64 - (self.config.num_train_timesteps / n) as i64;
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev =
            if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (mo, x) = (upcast(model_output)?, upcast(sample)?);

        let (c, alpha, sigma) = (&self.config, alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let pred_x0 = data_prediction(c.prediction_type, &mo, &x, alpha, sigma)?;
        let pred_x0 = clip_sample(pred_x0, c.clip_sample, c.clip_sample_range)?;
        let pred_eps = noise_prediction(c.prediction_type, &mo, &x, alpha, sigma)?;

        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta as f32 * variance.sqrt();
        let direction = mul(&pred_eps, (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt())?;
        let mut prev = (mul(&pred_x0, alpha_prod_t_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let z = draw_noise(noise, model_output)?;
            prev = (prev + mul(&upcast(&z)?, std_dev_t)?)?;
        }
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_at_timestep(&self.alphas_cumprod, original, noise, timestep)
    }
}
