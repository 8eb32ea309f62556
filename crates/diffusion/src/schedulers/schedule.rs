//! The host-side schedule math every scheduler shares: beta schedules, `alphas_cumprod`,
//! zero-terminal-SNR rescaling, timestep spacing, sigma interpolation and Karras sigmas.
//!
//! diffusers keeps `betas`, `alphas_cumprod` and `sigmas` in float32 torch tensors and does the
//! spacing and sigma conversions in float64 numpy; these functions use the same precision at each
//! point (so `alphas_cumprod` is bit-identical to diffusers', and the sigmas nearly always are).

use serde::{Deserialize, Serialize};

use crate::error::{DiffusionError, Result};

/// How betas grow over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// Evenly spaced square roots, squared (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of improved DDPM (`beta_start` / `beta_end` unused).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise.
    Epsilon,
    /// The velocity `alpha_t * noise - sigma_t * x0` (SD 2.x 768-v).
    VPrediction,
    /// The denoised sample (`original_sample` is diffusers' older name).
    #[serde(alias = "original_sample")]
    Sample,
}

/// How the inference timesteps are placed over the training timesteps (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Multiples of `num_train_timesteps / n` from 0, plus `steps_offset`.
    Leading,
    /// Counted down from `num_train_timesteps` (always includes the last timestep).
    Trailing,
    /// Evenly spaced over `[0, num_train_timesteps - 1]`.
    Linspace,
}

/// The sigma the last step denoises to (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    Zero,
    /// The smallest training sigma.
    SigmaMin,
}

/// The fields of a scheduler config that define its betas.
pub(crate) struct Betas<'a> {
    pub class: &'static str,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
}

impl Betas<'_> {
    /// diffusers' `alphas_cumprod` (float32), before any scheduler-specific patching.
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        if n < 2 {
            return Err(DiffusionError::config(
                self.class,
                "num_train_timesteps",
                format!("must be at least 2, got {n}"),
            ));
        }
        let mut betas: Vec<f32> = match self.trained_betas {
            Some(b) if b.len() != n => {
                return Err(DiffusionError::config(
                    self.class,
                    "trained_betas",
                    format!("has {} values but num_train_timesteps is {n}", b.len()),
                ));
            }
            Some(b) => b.iter().map(|&x| x as f32).collect(),
            None => match self.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(self.beta_start, self.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n).iter().map(|b| b * b).collect()
                }
                BetaSchedule::SquaredcosCapV2 => cosine_betas(n),
            },
        };
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        Ok(cumprod(betas.iter().map(|b| 1.0 - b)))
    }
}

/// The [`Betas`] of a scheduler config with diffusers' usual beta fields (`CLASS` names it in
/// errors).
macro_rules! betas {
    ($config:expr) => {
        $crate::schedulers::schedule::Betas {
            class: CLASS,
            num_train_timesteps: $config.num_train_timesteps,
            beta_start: $config.beta_start,
            beta_end: $config.beta_end,
            beta_schedule: $config.beta_schedule,
            trained_betas: $config.trained_betas.as_deref(),
            rescale_betas_zero_snr: $config.rescale_betas_zero_snr,
        }
    };
}
pub(crate) use betas;

impl Betas<'_> {
    /// `alphas_cumprod` as the sigma-based schedulers patch it: under zero terminal SNR the last
    /// value is `2^-24`, diffusers' stand-in for an infinite last sigma.
    pub fn sigma_alphas_cumprod(&self) -> Result<Vec<f32>> {
        let mut alphas_cumprod = self.alphas_cumprod()?;
        if self.rescale_betas_zero_snr {
            *alphas_cumprod.last_mut().unwrap_or(&mut 0.0) = 2f32.powi(-24);
        }
        Ok(alphas_cumprod)
    }
}

/// Every training timestep, descending (the schedule before `set_timesteps`).
pub(crate) fn train_timesteps(num_train_timesteps: usize) -> Vec<f64> {
    (0..num_train_timesteps).rev().map(|t| t as f64).collect()
}

/// The sigma the last step denoises to; `sigma_min` is the smallest sigma of the schedule.
pub(crate) fn final_sigma(final_sigmas_type: FinalSigmasType, sigma_min: f32) -> f32 {
    match final_sigmas_type {
        FinalSigmasType::Zero => 0.0,
        FinalSigmasType::SigmaMin => sigma_min,
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` as torch's CPU kernel computes it (a fused
/// multiply-add from the nearer end).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| if i < n / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((n - i - 1) as f32, end) })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine `alpha_bar` (computed in float64, stored as float32).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of float32 values (torch accumulates in float64).
fn cumprod(alphas: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .map(|a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut sqrt_ac: Vec<f32> = cumprod(betas.iter().map(|b| 1.0 - b)).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let scale = first / (first - last);
    for s in &mut sqrt_ac {
        *s = (*s - last) * scale;
    }
    let ac: Vec<f32> = sqrt_ac.iter().map(|s| s * s).collect();
    std::iter::once(ac[0]).chain(ac.windows(2).map(|w| w[1] / w[0])).map(|a| 1.0 - a).collect()
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32: the sigma of every training timestep.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.linspace(start, stop, num)` (float64, `endpoint` chooses whether `stop` is included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let step = (stop - start) / div as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for float64 (numpy fills `start + i * (start + step - start)`).
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| {
            if i == 0 {
                start
            } else if i == 1 {
                start + step
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// The inference timesteps (descending) for `spacing`, as diffusers' `set_timesteps` computes
/// them before rounding: `linspace` values are left unrounded, the others are whole numbers.
///
/// `solver` selects the DPM-Solver / UniPC variant, which spaces `n + 1` points over
/// `[0, last_timestep)` and drops the final one; `last_timestep` is `num_train_timesteps` for
/// the others.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
    solver: bool,
) -> Vec<f64> {
    let offset = steps_offset as f64;
    match (spacing, solver) {
        (TimestepSpacing::Linspace, false) => {
            np_linspace(0.0, (num_train_timesteps - 1) as f64, n, true).into_iter().rev().collect()
        }
        (TimestepSpacing::Linspace, true) => {
            np_linspace(0.0, last_timestep as f64 - 1.0, n + 1, true).into_iter().skip(1).rev().collect()
        }
        (TimestepSpacing::Leading, false) => {
            let ratio = num_train_timesteps / n;
            (0..n).rev().map(|i| (i * ratio) as f64 + offset).collect()
        }
        (TimestepSpacing::Leading, true) => {
            let ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| (i * ratio) as f64 + offset).collect()
        }
        (TimestepSpacing::Trailing, _) => {
            let ratio = num_train_timesteps as f64 / n as f64;
            np_arange(last_timestep as f64, 0.0, -ratio).into_iter().map(|t| t.round_ties_even() - 1.0).collect()
        }
    }
}

/// `np.interp(t, arange(len(sigmas)), sigmas)`: the sigma at a fractional training timestep.
pub(crate) fn interp_sigma(t: f64, sigmas: &[f32]) -> f64 {
    let last = sigmas.len() - 1;
    if t <= 0.0 {
        return sigmas[0] as f64;
    }
    if t >= last as f64 {
        return sigmas[last] as f64;
    }
    let j = t.floor() as usize;
    if j as f64 == t {
        return sigmas[j] as f64;
    }
    let slope = (sigmas[j + 1] as f64 - sigmas[j] as f64) / 1.0;
    slope * (t - j as f64) + sigmas[j] as f64
}

/// The natural logs of the training sigmas (diffusers' `log_sigmas`, float32).
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| ln32(s)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating
/// linearly in log-sigma.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let low_idx = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// Karras et al. (2022) sigmas: `n` values from `sigma_max` down to `sigma_min`, evenly spaced
/// in `sigma^(1/7)`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / RHO), sigma_max.powf(1.0 / RHO));
    np_linspace(0.0, 1.0, n, true).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(RHO)).collect()
}

/// `alpha_t = 1 / sqrt(sigma^2 + 1)` and `sigma_t = sigma * alpha_t` of a sigma (float32, as
/// diffusers' `_sigma_to_alpha_sigma_t`).
pub(crate) fn alpha_sigma_t(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)` of a sigma (float32), with its `alpha_t` and `sigma_t`.
pub(crate) fn lambda_of(sigma: f32) -> (f32, f32, f32) {
    let (alpha, sigma_t) = alpha_sigma_t(sigma);
    (ln32(alpha) - ln32(sigma_t), alpha, sigma_t)
}

// float32 transcendental functions as torch computes them on CPU: (nearly always) correctly
// rounded, which glibc's float32 `logf` / `expf` / `expm1f` (what `f32::ln` calls) are not.

pub(crate) fn ln32(x: f32) -> f32 {
    (x as f64).ln() as f32
}

pub(crate) fn exp32(x: f32) -> f32 {
    (x as f64).exp() as f32
}

pub(crate) fn expm1_32(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_spacing_keeps_numpys_extra_step() {
        // np.arange(1000, 0, -1000 / 61) has 62 elements; diffusers keeps the last (-1).
        let t = spaced_timesteps(TimestepSpacing::Trailing, 1000, 1000, 61, 0, false);
        assert_eq!(t.len(), 62);
        assert_eq!(t[61], -1.0);
        assert_eq!(spaced_timesteps(TimestepSpacing::Trailing, 1000, 1000, 10, 0, false).len(), 10);
    }

    #[test]
    fn interp_matches_the_table_at_integers() {
        let s = [1.0f32, 2.0, 4.0];
        assert_eq!(interp_sigma(1.0, &s), 2.0);
        assert_eq!(interp_sigma(1.5, &s), 3.0);
        assert_eq!(interp_sigma(-1.0, &s), 1.0);
        assert_eq!(interp_sigma(5.0, &s), 4.0);
    }
}
