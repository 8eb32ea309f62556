//! Euler (Karras et al. 2022, algorithm 2 without churn), diffusers `EulerDiscreteScheduler`:
//! A1111's "Euler".

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::schedule::{
    BetaSchedule, FinalSigmasType, PredictionType, TimestepSpacing, betas, final_sigma, interp_sigma, karras_sigmas,
    ln32, log_sigmas, sigma_to_t, spaced_timesteps, train_sigmas,
};
use super::{Missing, NoiseSource, Scheduler, StepIndex, check_steps, div, mul, refuse_flag, sigma_at, upcast};
use crate::error::Result;

const CLASS: &str = "EulerDiscreteScheduler";

/// How sigmas between training timesteps are found (`interpolation_type`; `log_linear` is not
/// implemented).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    Linear,
}

/// What the UNet is given as its timestep (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// The (fractional) training timestep.
    Discrete,
    /// `0.25 * ln(sigma)` when `prediction_type` is `v_prediction` (EDM-style models), else as
    /// `discrete`.
    Continuous,
}

/// `EulerDiscreteScheduler`'s `scheduler_config.json` (exponential and beta sigmas are not
/// implemented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub interpolation_type: InterpolationType,
    /// Karras sigmas between `sigma_min` and `sigma_max` (default: the schedule's ends).
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    pub timestep_type: TimestepType,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

/// The Euler sampler on the sigma (variance-exploding) parameterisation of the schedule.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteConfig,
    /// The sigma of every training timestep (float32).
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    index: StepIndex,
}

impl EulerDiscreteScheduler {
    pub fn new(config: EulerDiscreteConfig) -> Result<Self> {
        refuse_flag(CLASS, "use_exponential_sigmas", config.use_exponential_sigmas, "exponential sigmas")?;
        refuse_flag(CLASS, "use_beta_sigmas", config.use_beta_sigmas, "beta sigmas")?;
        let train_sigmas = train_sigmas(&betas!(config).sigma_alphas_cumprod()?);
        let sigmas: Vec<f32> = train_sigmas.iter().rev().copied().chain([0.0]).collect();
        let timesteps = if continuous(&config) {
            continuous_timesteps(&sigmas)
        } else {
            (0..config.num_train_timesteps).rev().map(|t| t as f32 as f64).collect()
        };
        Ok(Self { config, train_sigmas, timesteps, sigmas, index: StepIndex::default() })
    }

    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }

    /// The sigmas of the run (float32), one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

fn continuous(config: &EulerDiscreteConfig) -> bool {
    config.timestep_type == TimestepType::Continuous && config.prediction_type == PredictionType::VPrediction
}

/// The `continuous` timesteps `0.25 * ln(sigma)` of all sigmas but the final one.
fn continuous_timesteps(sigmas: &[f32]) -> Vec<f64> {
    sigmas[..sigmas.len() - 1].iter().map(|&s| (0.25 * ln32(s)) as f64).collect()
}

/// `init_noise_sigma` of the Euler schedulers: the largest sigma (or `sqrt(max^2 + 1)` under
/// leading spacing).
pub(super) fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// The timesteps (float32 values) of the Euler schedulers' spacings.
pub(super) fn euler_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let spaced = spaced_timesteps(spacing, num_train_timesteps, num_train_timesteps, n, steps_offset, false);
    spaced
        .into_iter()
        .map(|t| if spacing == TimestepSpacing::Linspace { t } else { t.round_ties_even() } as f32 as f64)
        .collect()
}

/// The Euler schedulers' `scale_model_input`: `sample / sqrt(sigma^2 + 1)` at the current step.
pub(super) fn euler_scale_model_input(
    index: &mut StepIndex,
    timesteps: &[f64],
    sigmas: &[f32],
    sample: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let sigma = sigma_at(sigmas, index.current(timesteps, timestep, Missing::Fail)?)?;
    Ok(div(&upcast(sample)?, (sigma * sigma + 1.0).sqrt())?.to_dtype(sample.dtype())?)
}

/// The Euler schedulers' `add_noise`: `original + sigma * noise` at the sigma of `timestep`.
pub(super) fn euler_add_noise(
    index: &StepIndex,
    timesteps: &[f64],
    sigmas: &[f32],
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let sigma = sigma_at(sigmas, index.for_add_noise(timesteps, timestep, Missing::Fail)?)?;
    Ok((original + mul(&upcast(noise)?, sigma)?.to_dtype(original.dtype())?)?)
}

/// An Euler step of `x` from `sigma` to `sigma_to`, along the derivative `(x - pred_x0) / sigma`.
pub(super) fn euler_update(x: &Tensor, pred_x0: &Tensor, sigma: f32, sigma_to: f32) -> Result<Tensor> {
    let derivative = div(&(x - pred_x0)?, sigma)?;
    Ok((x + mul(&derivative, sigma_to - sigma)?)?)
}

/// The denoised sample of the Euler schedulers (`x` in float32).
pub(super) fn euler_pred_x0(prediction: PredictionType, mo: &Tensor, x: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Sample => mo.clone(),
        PredictionType::Epsilon => (x - mul(mo, sigma)?)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            (mul(mo, -sigma / s2.sqrt())? + div(x, s2)?)?
        }
    })
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps)?;
        let c = &self.config;
        let mut timesteps =
            euler_timesteps(c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp_sigma(t, &self.train_sigmas)).collect();
        if c.use_karras_sigmas {
            let last = sigmas.len() - 1;
            sigmas = karras_sigmas(
                c.sigma_min.unwrap_or(sigmas[last]),
                c.sigma_max.unwrap_or(sigmas[0]),
                num_inference_steps,
            );
            let log_sigmas = log_sigmas(&self.train_sigmas);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        let sigma_last = final_sigma(c.final_sigmas_type, self.train_sigmas[0]);
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([sigma_last]).collect();
        if continuous(c) {
            timesteps = continuous_timesteps(&self.sigmas);
        }
        self.timesteps = timesteps;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index.current(&self.timesteps, timestep, Missing::Fail)?;
        let (sigma, sigma_next) = (sigma_at(&self.sigmas, i)?, sigma_at(&self.sigmas, i + 1)?);
        let (mo, x) = (upcast(model_output)?, upcast(sample)?);
        let pred_x0 = euler_pred_x0(self.config.prediction_type, &mo, &x, sigma)?;
        let prev = euler_update(&x, &pred_x0, sigma, sigma_next)?;
        self.index.advance();
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        euler_add_noise(&self.index, &self.timesteps, &self.sigmas, original, noise, timestep)
    }
}
