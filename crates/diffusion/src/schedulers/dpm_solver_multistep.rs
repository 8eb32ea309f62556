//! DPM-Solver++ (Lu et al. 2022), diffusers `DPMSolverMultistepScheduler`: A1111's "DPM++ 2M",
//! "DPM++ 2M Karras" and (with `sde-dpmsolver++`) "DPM++ 2M SDE Karras".

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::schedule::{
    BetaSchedule, FinalSigmasType, PredictionType, TimestepSpacing, alpha_sigma_t, betas, exp32, final_sigma,
    interp_sigma, karras_sigmas, lambda_of, ln32, log_sigmas, sigma_to_t, spaced_timesteps, train_sigmas,
    train_timesteps,
};
use super::{
    History, Missing, NoiseSource, Scheduler, StepIndex, add_noise_alpha_sigma, check_steps, data_prediction,
    draw_noise, mul, refuse_flag, sigma_at, upcast,
};
use crate::error::{DiffusionError, Result};

const CLASS: &str = "DPMSolverMultistepScheduler";

/// The solver (`algorithm_type`; the deprecated `dpmsolver` and `sde-dpmsolver` are not
/// implemented).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlgorithmType {
    /// DPM-Solver++ (deterministic), on the data prediction.
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    /// The SDE variant of DPM-Solver++: draws noise at every step.
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
}

/// The second-order update (`solver_type`; diffusers reads `logrho`, `bh1` and `bh2` as
/// `midpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    #[serde(alias = "logrho", alias = "bh1", alias = "bh2")]
    Midpoint,
    Heun,
}

/// `DPMSolverMultistepScheduler`'s `scheduler_config.json` (dynamic thresholding, learned
/// variance, and lu-lambda, exponential, beta and flow sigmas are not implemented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpmSolverMultistepConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    /// 1, 2 or 3.
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub algorithm_type: AlgorithmType,
    pub solver_type: SolverType,
    /// First-order final steps for runs of fewer than 15 steps.
    pub lower_order_final: bool,
    /// A first-order (Euler) last step.
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub final_sigmas_type: FinalSigmasType,
    /// Skips the training timesteps whose `lambda = log(alpha / sigma)` is below this.
    pub lambda_min_clipped: f64,
    /// Must be `None` (learned variances are not implemented).
    pub variance_type: Option<String>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
}

impl Default for DpmSolverMultistepConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
        }
    }
}

/// The multistep DPM-Solver++: each step reuses the data predictions of the previous ones.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverMultistepConfig,
    train_sigmas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// The last `solver_order` data predictions.
    model_outputs: History,
    lower_order_nums: usize,
    index: StepIndex,
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: DpmSolverMultistepConfig) -> Result<Self> {
        refuse_flag(CLASS, "thresholding", config.thresholding, "dynamic thresholding")?;
        refuse_flag(CLASS, "use_exponential_sigmas", config.use_exponential_sigmas, "exponential sigmas")?;
        refuse_flag(CLASS, "use_beta_sigmas", config.use_beta_sigmas, "beta sigmas")?;
        refuse_flag(CLASS, "use_lu_lambdas", config.use_lu_lambdas, "lu lambdas")?;
        refuse_flag(CLASS, "use_flow_sigmas", config.use_flow_sigmas, "flow sigmas")?;
        refuse_flag(CLASS, "use_dynamic_shifting", config.use_dynamic_shifting, "dynamic shifting")?;
        if let Some(v) = &config.variance_type {
            return Err(DiffusionError::config(
                CLASS,
                "variance_type",
                format!("learned variance `{v}` is not implemented"),
            ));
        }
        if !(1..=3).contains(&config.solver_order) {
            return Err(DiffusionError::config(
                CLASS,
                "solver_order",
                format!("must be 1, 2 or 3, got {}", config.solver_order),
            ));
        }
        let alphas_cumprod = betas!(config).sigma_alphas_cumprod()?;
        let train_sigmas = train_sigmas(&alphas_cumprod);
        let timesteps = train_timesteps(config.num_train_timesteps);
        let model_outputs = History::new(config.solver_order);
        Ok(Self {
            config,
            sigmas: train_sigmas.clone(),
            train_sigmas,
            alphas_cumprod,
            timesteps,
            model_outputs,
            lower_order_nums: 0,
            index: StepIndex::default(),
        })
    }

    pub fn config(&self) -> &DpmSolverMultistepConfig {
        &self.config
    }

    /// The sigmas of the run (float32), one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The training timestep after which `lambda_min_clipped` cuts the schedule.
    fn last_timestep(&self) -> usize {
        // searchsorted(flip(lambda_t), lambda_min_clipped): the clipped count at the noisy end.
        let clipped = self
            .alphas_cumprod
            .iter()
            .rev()
            .take_while(|&&ac| {
                let lambda = ln32(ac.sqrt()) - ln32((1.0 - ac).sqrt());
                (lambda as f64) < self.config.lambda_min_clipped
            })
            .count();
        self.config.num_train_timesteps - clipped
    }

    fn first_order(&self, i: usize, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let m0 = self.model_outputs.get(1)?;
        let (lambda_t, alpha_t, sigma_t) = lambda_t_of(&self.sigmas, i + 1)?;
        let (lambda_s, _, sigma_s) = lambda_t_of(&self.sigmas, i)?;
        let h = lambda_t - lambda_s;
        match noise {
            None => Ok((mul(x, sigma_t / sigma_s)? - mul(m0, alpha_t * (exp32(-h) - 1.0))?)?),
            Some(z) => Ok(((mul(x, sigma_t / sigma_s * exp32(-h))? + mul(m0, alpha_t * (1.0 - exp32(-2.0 * h)))?)?
                + mul(z, sigma_t * (1.0 - exp32(-2.0 * h)).sqrt())?)?),
        }
    }

    fn second_order(&self, i: usize, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (m0, m1) = (self.model_outputs.get(1)?, self.model_outputs.get(2)?);
        let (lambda_t, alpha_t, sigma_t) = lambda_t_of(&self.sigmas, i + 1)?;
        let (lambda_s0, _, sigma_s0) = lambda_t_of(&self.sigmas, i)?;
        let (lambda_s1, _, _) = lambda_t_of(&self.sigmas, i.wrapping_sub(1))?;
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let heun = self.config.solver_type == SolverType::Heun;
        match noise {
            None => {
                let c0 = alpha_t * (exp32(-h) - 1.0);
                let base = (mul(x, sigma_t / sigma_s0)? - mul(m0, c0)?)?;
                if heun {
                    Ok((base + mul(&d1, alpha_t * ((exp32(-h) - 1.0) / h + 1.0))?)?)
                } else {
                    Ok((base - mul(&d1, 0.5 * c0)?)?)
                }
            }
            Some(z) => {
                let c0 = alpha_t * (1.0 - exp32(-2.0 * h));
                let base = (mul(x, sigma_t / sigma_s0 * exp32(-h))? + mul(m0, c0)?)?;
                let c1 = if heun { alpha_t * ((1.0 - exp32(-2.0 * h)) / (-2.0 * h) + 1.0) } else { 0.5 * c0 };
                Ok(((base + mul(&d1, c1)?)? + mul(z, sigma_t * (1.0 - exp32(-2.0 * h)).sqrt())?)?)
            }
        }
    }

    fn third_order(&self, i: usize, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (m0, m1, m2) = (self.model_outputs.get(1)?, self.model_outputs.get(2)?, self.model_outputs.get(3)?);
        let (lambda_t, alpha_t, sigma_t) = lambda_t_of(&self.sigmas, i + 1)?;
        let (lambda_s0, _, sigma_s0) = lambda_t_of(&self.sigmas, i)?;
        let (lambda_s1, _, _) = lambda_t_of(&self.sigmas, i.wrapping_sub(1))?;
        let (lambda_s2, _, _) = lambda_t_of(&self.sigmas, i.wrapping_sub(2))?;
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let d1 = (&d1_0 + mul(&(&d1_0 - &d1_1)?, r0 / (r0 + r1))?)?;
        let d2 = mul(&(&d1_0 - &d1_1)?, 1.0 / (r0 + r1))?;
        match noise {
            None => {
                let e = exp32(-h) - 1.0;
                Ok((((mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * e)?)? + mul(&d1, alpha_t * (e / h + 1.0))?)?
                    - mul(&d2, alpha_t * ((exp32(-h) - 1.0 + h) / (h * h) - 0.5))?)?)
            }
            Some(z) => {
                let e2 = 1.0 - exp32(-2.0 * h);
                let c2 = alpha_t * ((1.0 - exp32(-2.0 * h) - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5);
                Ok(((((mul(x, sigma_t / sigma_s0 * exp32(-h))? + mul(m0, alpha_t * e2)?)?
                    + mul(&d1, alpha_t * (e2 / (-2.0 * h) + 1.0))?)?
                    + mul(&d2, c2)?)?
                    + mul(z, sigma_t * (1.0 - exp32(-2.0 * h)).sqrt())?)?)
            }
        }
    }
}

/// `(lambda, alpha_t, sigma_t)` of `sigmas[i]`.
fn lambda_t_of(sigmas: &[f32], i: usize) -> Result<(f32, f32, f32)> {
    Ok(lambda_of(sigma_at(sigmas, i)?))
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps)?;
        let c = &self.config;
        let n = num_inference_steps;
        let spaced =
            spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, self.last_timestep(), n, c.steps_offset, true);
        let mut timesteps: Vec<f64> = spaced.into_iter().map(f64::round_ties_even).collect();
        let sigmas: Vec<f64> = if c.use_karras_sigmas {
            let ts = &self.train_sigmas;
            let karras = karras_sigmas(ts[0] as f64, ts[ts.len() - 1] as f64, n);
            let log_sigmas = log_sigmas(ts);
            timesteps = karras
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    // diffusers rounds, except for squaredcos_cap_v2 (truncated by the int64 cast).
                    if c.beta_schedule == BetaSchedule::SquaredcosCapV2 { t.trunc() } else { t.round_ties_even() }
                })
                .collect();
            karras
        } else {
            timesteps.iter().map(|&t| interp_sigma(t, &self.train_sigmas)).collect()
        };
        let sigma_last = final_sigma(c.final_sigmas_type, self.train_sigmas[0]);
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([sigma_last]).collect();
        self.timesteps = timesteps;
        self.model_outputs = History::new(c.solver_order);
        self.lower_order_nums = 0;
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
        let i = self.index.current(&self.timesteps, timestep, Missing::Last)?;
        let c = &self.config;
        let len = self.timesteps.len();
        let lower_order_final = i == len - 1
            && (c.euler_at_final || (c.lower_order_final && len < 15) || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i == len.wrapping_sub(2) && c.lower_order_final && len < 15;

        let (mo, x) = (upcast(model_output)?, upcast(sample)?);
        let (alpha_t, sigma_t) = alpha_sigma_t(sigma_at(&self.sigmas, i)?);
        self.model_outputs.push(data_prediction(c.prediction_type, &mo, &x, alpha_t, sigma_t)?);

        let z = match c.algorithm_type {
            AlgorithmType::SdeDpmSolverPlusPlus => Some(upcast(&draw_noise(noise, &x)?)?),
            AlgorithmType::DpmSolverPlusPlus => None,
        };
        let prev = if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &x, z.as_ref())?
        } else if c.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, &x, z.as_ref())?
        } else {
            self.third_order(i, &x, z.as_ref())?
        };
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.index.advance();
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_alpha_sigma(&self.index, &self.timesteps, &self.sigmas, original, noise, timestep)
    }
}
