//! UniPC (Zhao et al. 2023), diffusers `UniPCMultistepScheduler`: A1111's "UniPC" (bh2, order 2
//! by default).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::schedule::{
    BetaSchedule, FinalSigmasType, PredictionType, TimestepSpacing, alpha_sigma_t, betas, expm1_32, final_sigma,
    interp_sigma, karras_sigmas, lambda_of, log_sigmas, sigma_to_t, spaced_timesteps, train_sigmas, train_timesteps,
};
use super::{
    History, Missing, NoiseSource, Scheduler, StepIndex, add_noise_alpha_sigma, check_steps, data_prediction, div, mul,
    noise_prediction, refuse_flag, sigma_at, upcast,
};
use crate::error::{DiffusionError, Result};

const CLASS: &str = "UniPCMultistepScheduler";

/// The `B(h)` of the UniPC update (`solver_type`; diffusers reads `midpoint`, `heun` and `logrho`
/// as `bh2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UniPcSolverType {
    /// `B(h) = h`.
    Bh1,
    /// `B(h) = e^h - 1`.
    #[serde(alias = "midpoint", alias = "heun", alias = "logrho")]
    Bh2,
}

/// `UniPCMultistepScheduler`'s `scheduler_config.json` (dynamic thresholding, `solver_p`, and
/// exponential, beta and flow sigmas are not implemented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UniPcMultistepConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    /// The order of the predictor (at least 1).
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    /// Solve on the data prediction (else on the noise prediction).
    pub predict_x0: bool,
    pub solver_type: UniPcSolverType,
    /// Lower orders over the final steps.
    pub lower_order_final: bool,
    /// Steps whose corrector is skipped.
    pub disable_corrector: Vec<usize>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_flow_sigmas: bool,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub final_sigmas_type: FinalSigmasType,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

impl Default for UniPcMultistepConfig {
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
            predict_x0: true,
            solver_type: UniPcSolverType::Bh2,
            lower_order_final: true,
            disable_corrector: vec![],
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            final_sigmas_type: FinalSigmasType::Zero,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

/// UniPC: a multistep predictor (UniP) with a corrector (UniC) that reuses the model output of
/// the next step, so it costs no extra UNet call.
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler {
    config: UniPcMultistepConfig,
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// The last `solver_order` converted model outputs.
    model_outputs: History,
    lower_order_nums: usize,
    /// The order of the last predictor step (the next corrector uses it).
    this_order: usize,
    last_sample: Option<Tensor>,
    index: StepIndex,
}

impl UniPcMultistepScheduler {
    pub fn new(config: UniPcMultistepConfig) -> Result<Self> {
        refuse_flag(CLASS, "thresholding", config.thresholding, "dynamic thresholding")?;
        refuse_flag(CLASS, "use_exponential_sigmas", config.use_exponential_sigmas, "exponential sigmas")?;
        refuse_flag(CLASS, "use_beta_sigmas", config.use_beta_sigmas, "beta sigmas")?;
        refuse_flag(CLASS, "use_flow_sigmas", config.use_flow_sigmas, "flow sigmas")?;
        refuse_flag(CLASS, "use_dynamic_shifting", config.use_dynamic_shifting, "dynamic shifting")?;
        if config.solver_order == 0 {
            return Err(DiffusionError::config(CLASS, "solver_order", "must be at least 1"));
        }
        let train_sigmas = train_sigmas(&betas!(config).sigma_alphas_cumprod()?);
        let timesteps = train_timesteps(config.num_train_timesteps);
        let model_outputs = History::new(config.solver_order);
        Ok(Self {
            config,
            sigmas: train_sigmas.clone(),
            train_sigmas,
            timesteps,
            model_outputs,
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
            index: StepIndex::default(),
        })
    }

    pub fn config(&self) -> &UniPcMultistepConfig {
        &self.config
    }

    /// The sigmas of the run (float32), one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn convert_model_output(&self, mo: &Tensor, x: &Tensor, sigma: f32) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma_t(sigma);
        let prediction = if self.config.predict_x0 { data_prediction } else { noise_prediction };
        prediction(self.config.prediction_type, mo, x, alpha_t, sigma_t)
    }

    /// The UniP / UniC update of `x` from `sigmas[s0]` to `sigmas[t]`, using the stored outputs at
    /// `sigmas[s0 - 1]`, `sigmas[s0 - 2]`, ... (`order - 1` of them). `corrector` is the model
    /// output at `t` for UniC, `None` for UniP.
    fn update(&self, x: &Tensor, t: usize, s0: usize, order: usize, corrector: Option<&Tensor>) -> Result<Tensor> {
        let m0 = self.model_outputs.get(1)?;
        let (lambda_t, alpha_t, sigma_t) = lambda_of(sigma_at(&self.sigmas, t)?);
        let (lambda_s0, alpha_s0, sigma_s0) = lambda_of(sigma_at(&self.sigmas, s0)?);
        let h = lambda_t - lambda_s0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let si = s0.checked_sub(k).ok_or_else(|| DiffusionError::input("timestep", "not enough earlier steps"))?;
            let (lambda_si, _, _) = lambda_of(sigma_at(&self.sigmas, si)?);
            let rk = (lambda_si - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div(&(self.model_outputs.get(k + 1)? - m0)?, rk)?);
        }
        rks.push(1.0);

        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = expm1_32(hh);
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = match self.config.solver_type {
            UniPcSolverType::Bh1 => hh,
            UniPcSolverType::Bh2 => expm1_32(hh),
        };
        let mut factorial = 1u64;
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|&rk| rk.powi(i as i32 - 1)).collect::<Vec<f32>>());
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }

        let (ratio, c_m0, c_res) = if self.config.predict_x0 {
            (sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h)
        } else {
            (alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h)
        };
        let x_t_ = (mul(x, ratio)? - mul(m0, c_m0)?)?;
        match corrector {
            None => {
                if d1s.is_empty() {
                    return Ok(x_t_);
                }
                let rhos = if order == 2 { vec![0.5] } else { solve(trim(&r, order - 1), &b[..order - 1]) };
                let res = weighted_sum(&rhos, &d1s)?;
                Ok((x_t_ - mul(&res, c_res)?)?)
            }
            Some(model_t) => {
                let rhos = if order == 1 { vec![0.5] } else { solve(r, &b) };
                let d1_t = mul(&(model_t - m0)?, rhos[order - 1])?;
                let res = if d1s.is_empty() { d1_t } else { (weighted_sum(&rhos[..order - 1], &d1s)? + d1_t)? };
                Ok((x_t_ - mul(&res, c_res)?)?)
            }
        }
    }
}

/// The top-left `k x k` block of `r`.
fn trim(r: &[Vec<f32>], k: usize) -> Vec<Vec<f32>> {
    r[..k].iter().map(|row| row[..k].to_vec()).collect()
}

/// `sum_k w[k] * t[k]` (diffusers' `einsum("k,bkc...->bc...")`).
fn weighted_sum(w: &[f32], t: &[Tensor]) -> Result<Tensor> {
    let mut acc = mul(&t[0], w[0])?;
    for (w, t) in w.iter().zip(t).skip(1) {
        acc = (acc + mul(t, *w)?)?;
    }
    Ok(acc)
}

/// Solves the small system `a x = b` by Gaussian elimination with partial pivoting and fused
/// multiply-adds (float32, as `torch.linalg.solve` (LAPACK) computes it for UniPC).
fn solve(mut a: Vec<Vec<f32>>, b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let mut b = b.to_vec();
    for col in 0..n {
        let pivot = (col..n).fold(col, |p, row| if a[row][col].abs() > a[p][col].abs() { row } else { p });
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x = (-f).mul_add(*p, *x);
            }
            b[row] = (-f).mul_add(b[col], b[row]);
        }
    }
    let mut x = vec![0.0f32; n];
    for row in (0..n).rev() {
        let s = (row + 1..n).fold(b[row], |s, k| (-a[row][k]).mul_add(x[k], s));
        x[row] = s / a[row][row];
    }
    x
}

impl Scheduler for UniPcMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps)?;
        let c = &self.config;
        let n = num_inference_steps;
        let train = c.num_train_timesteps;
        let spaced = spaced_timesteps(c.timestep_spacing, train, train, n, c.steps_offset, true);
        let mut timesteps: Vec<f64> = spaced.into_iter().map(f64::round_ties_even).collect();
        let ts = &self.train_sigmas;
        let (sigmas, sigma_last): (Vec<f64>, f32) = if c.use_karras_sigmas {
            let karras =
                karras_sigmas(c.sigma_min.unwrap_or(ts[0] as f64), c.sigma_max.unwrap_or(ts[ts.len() - 1] as f64), n);
            let log_sigmas = log_sigmas(ts);
            timesteps = karras.iter().map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even()).collect();
            let last = final_sigma(c.final_sigmas_type, karras[karras.len() - 1] as f32);
            (karras, last)
        } else {
            (timesteps.iter().map(|&t| interp_sigma(t, ts)).collect(), final_sigma(c.final_sigmas_type, ts[0]))
        };
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([sigma_last]).collect();
        self.timesteps = timesteps;
        self.model_outputs = History::new(c.solver_order);
        self.lower_order_nums = 0;
        self.last_sample = None;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index.current(&self.timesteps, timestep, Missing::Last)?;
        let (mo, mut x) = (upcast(model_output)?, upcast(sample)?);
        let converted = self.convert_model_output(&mo, &x, sigma_at(&self.sigmas, i)?)?;
        if let Some(last) = &self.last_sample
            && i > 0
            && !self.config.disable_corrector.contains(&(i - 1))
        {
            x = self.update(last, i, i - 1, self.this_order, Some(&converted))?;
        }
        self.model_outputs.push(converted);

        let c = &self.config;
        let order = if c.lower_order_final {
            c.solver_order.min(self.timesteps.len().saturating_sub(i))
        } else {
            c.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.update(&x, i + 1, i, self.this_order, None)?;
        self.last_sample = Some(x);
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
        self.index.advance();
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_alpha_sigma(&self.index, &self.timesteps, &self.sigmas, original, noise, timestep)
    }
}
