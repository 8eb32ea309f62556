//! Latent consistency models (Luo et al. 2023), diffusers `LCMScheduler`: few-step sampling with
//! an LCM (or LCM-LoRA) UNet.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::schedule::{BetaSchedule, PredictionType, betas, np_linspace, train_timesteps};
use super::{
    Missing, NoiseSource, Scheduler, StepIndex, add_noise_at_timestep, check_steps, clip_sample, data_prediction,
    draw_noise, mul, refuse_flag, train_index, upcast,
};
use crate::error::{DiffusionError, Result};

const CLASS: &str = "LCMScheduler";

/// `LCMScheduler`'s `scheduler_config.json` (dynamic thresholding is not implemented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LcmConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    /// The length of the distillation schedule the inference timesteps are picked from.
    pub original_inference_steps: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    /// Multiplies the timestep in the consistency boundary conditions `c_skip` and `c_out`.
    pub timestep_scaling: f64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The multistep consistency sampler: denoise fully, then re-noise to the next timestep.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: LcmConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
}

impl LcmScheduler {
    pub fn new(config: LcmConfig) -> Result<Self> {
        refuse_flag(CLASS, "thresholding", config.thresholding, "dynamic thresholding")?;
        let alphas_cumprod = betas!(config).alphas_cumprod()?;
        let original = config.original_inference_steps;
        if original == 0 || original > config.num_train_timesteps {
            return Err(DiffusionError::config(
                CLASS,
                "original_inference_steps",
                format!("must be in [1, num_train_timesteps = {}], got {original}", config.num_train_timesteps),
            ));
        }
        let timesteps = train_timesteps(config.num_train_timesteps);
        Ok(Self { config, alphas_cumprod, timesteps, index: StepIndex::default() })
    }

    pub fn config(&self) -> &LcmConfig {
        &self.config
    }
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps)?;
        let original = self.config.original_inference_steps;
        if num_inference_steps > original {
            return Err(DiffusionError::input(
                "num_inference_steps",
                format!("{num_inference_steps} is more than original_inference_steps {original}"),
            ));
        }
        let k = self.config.num_train_timesteps / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        self.timesteps = np_linspace(0.0, origin.len() as f64, num_inference_steps, false)
            .into_iter()
            .map(|i| origin[i.floor() as usize] as f64)
            .collect();
        self.index.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn set_begin_index(&mut self, index: usize) {
        self.index.begin = Some(index);
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index.current(&self.timesteps, timestep, Missing::Fail)?;
        let t = train_index(timestep, self.config.num_train_timesteps)?;
        let prev_t = match self.timesteps.get(i + 1) {
            Some(&p) => train_index(p, self.config.num_train_timesteps)?,
            None => t,
        };
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = self.alphas_cumprod[prev_t];
        let (beta_prod_t, beta_prod_t_prev) = (1.0 - alpha_prod_t, 1.0 - alpha_prod_t_prev);

        // The consistency boundary conditions (sigma_data = 0.5).
        let scaled = t as f32 * self.config.timestep_scaling as f32;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();

        let (mo, x) = (upcast(model_output)?, upcast(sample)?);
        let c = &self.config;
        let pred_x0 = data_prediction(c.prediction_type, &mo, &x, alpha_prod_t.sqrt(), beta_prod_t.sqrt())?;
        let pred_x0 = clip_sample(pred_x0, c.clip_sample, c.clip_sample_range)?;
        let denoised = (mul(&pred_x0, c_out)? + mul(&x, c_skip)?)?;
        let prev = if i + 1 != self.timesteps.len() {
            let z = upcast(&draw_noise(noise, &denoised)?)?;
            (mul(&denoised, alpha_prod_t_prev.sqrt())? + mul(&z, beta_prod_t_prev.sqrt())?)?
        } else {
            denoised
        };
        self.index.advance();
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_at_timestep(&self.alphas_cumprod, original, noise, timestep)
    }
}
