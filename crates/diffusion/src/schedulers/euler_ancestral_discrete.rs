//! Euler ancestral, diffusers `EulerAncestralDiscreteScheduler`: A1111's "Euler a".

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::euler_discrete::{
    euler_add_noise, euler_init_noise_sigma, euler_pred_x0, euler_scale_model_input, euler_timesteps, euler_update,
};
use super::schedule::{
    BetaSchedule, PredictionType, TimestepSpacing, betas, interp_sigma, train_sigmas, train_timesteps,
};
use super::{Missing, NoiseSource, Scheduler, StepIndex, check_steps, draw_noise, mul, sigma_at, upcast};
use crate::error::{DiffusionError, Result};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// `EulerAncestralDiscreteScheduler`'s `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EulerAncestralDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon` or `v_prediction` (diffusers does not implement `sample` here).
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for EulerAncestralDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Euler steps to `sigma_down`, plus fresh noise of `sigma_up` at every step.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralDiscreteConfig,
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    index: StepIndex,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(config: EulerAncestralDiscreteConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(DiffusionError::config(CLASS, "prediction_type", "`sample` is not implemented"));
        }
        let train_sigmas = train_sigmas(&betas!(config).sigma_alphas_cumprod()?);
        let sigmas = train_sigmas.iter().rev().copied().chain([0.0]).collect();
        let timesteps = train_timesteps(config.num_train_timesteps);
        Ok(Self { config, train_sigmas, timesteps, sigmas, index: StepIndex::default() })
    }

    pub fn config(&self) -> &EulerAncestralDiscreteConfig {
        &self.config
    }

    /// The sigmas of the run (float32), one per timestep plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps)?;
        let c = &self.config;
        self.timesteps =
            euler_timesteps(c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset);
        self.sigmas = self.timesteps.iter().map(|&t| interp_sigma(t, &self.train_sigmas) as f32).chain([0.0]).collect();
        self.index.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        euler_init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn set_begin_index(&mut self, index: usize) {
        self.index.begin = Some(index);
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        euler_scale_model_input(&mut self.index, &self.timesteps, &self.sigmas, sample, timestep)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index.current(&self.timesteps, timestep, Missing::Fail)?;
        let (sigma, sigma_to) = (sigma_at(&self.sigmas, i)?, sigma_at(&self.sigmas, i + 1)?);
        let (mo, x) = (upcast(model_output)?, upcast(sample)?);
        let pred_x0 = euler_pred_x0(self.config.prediction_type, &mo, &x, sigma)?;
        let sigma_up = (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let prev = euler_update(&x, &pred_x0, sigma, sigma_down)?;
        let z = upcast(&draw_noise(noise, model_output)?)?;
        let prev = (prev + mul(&z, sigma_up)?)?;
        self.index.advance();
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        euler_add_noise(&self.index, &self.timesteps, &self.sigmas, original, noise, timestep)
    }
}
