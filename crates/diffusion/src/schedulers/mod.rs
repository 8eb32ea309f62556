//! The diffusion schedulers of diffusers 0.42.1, step for step: DDIM, DDPM, Euler, Euler
//! ancestral, DPM-Solver++ (2M, 2M Karras, 2M SDE Karras), UniPC and LCM.
//!
//! A sampling loop drives any [`Scheduler`] the way a diffusers pipeline does:
//!
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use easyphoto_diffusion::schedulers::{Sampler, Scheduler};
//! # fn unet(x: &Tensor, t: f64) -> candle_core::Result<Tensor> { Ok(x.clone()) }
//! # fn main() -> easyphoto_diffusion::Result<()> {
//! let base = serde_json::from_str(r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085,
//!     "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}"#).unwrap();
//! let mut scheduler = "DPM++ 2M SDE Karras".parse::<Sampler>()?.config(&base)?.build()?;
//! scheduler.set_timesteps(25)?;
//! let mut noise = |like: &Tensor| like.randn_like(0.0, 1.0);
//! let mut latents = (Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &Device::Cpu)? * scheduler.init_noise_sigma())?;
//! for t in scheduler.timesteps().to_vec() {
//!     let input = scheduler.scale_model_input(&latents, t)?;
//!     let eps = unet(&input, t)?;
//!     latents = scheduler.step(&eps, t, &latents, &mut noise)?;
//! }
//! # Ok(()) }
//! ```
//!
//! Scalars are computed on the host in the precision diffusers uses for them (float32 for what it
//! keeps in torch tensors, float64 for its numpy schedule math); tensor arithmetic runs in float32
//! (float64 for float64 inputs) and the result comes back in the dtype diffusers returns.

mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod lcm;
pub mod schedule;
pub mod unipc_multistep;

use candle_core::{DType, Tensor};

use crate::error::{DiffusionError, Result};
use schedule::{alpha_sigma_t, spaced_timesteps};

pub use config::{Sampler, SchedulerConfig};
pub use ddim::{DdimConfig, DdimScheduler};
pub use ddpm::{DdpmConfig, DdpmScheduler, VarianceType};
pub use dpm_solver_multistep::{AlgorithmType, DpmSolverMultistepConfig, DpmSolverMultistepScheduler, SolverType};
pub use euler_ancestral_discrete::{EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler};
pub use euler_discrete::{EulerDiscreteConfig, EulerDiscreteScheduler, InterpolationType, TimestepType};
pub use lcm::{LcmConfig, LcmScheduler};
pub use schedule::{BetaSchedule, FinalSigmasType, PredictionType, TimestepSpacing};
pub use unipc_multistep::{UniPcMultistepConfig, UniPcMultistepScheduler, UniPcSolverType};

/// Supplies the Gaussian noise stochastic schedulers draw at each step (the caller decides where
/// it comes from: seeded CPU RNG, or fixed tensors in tests).
pub trait NoiseSource {
    /// Standard normal noise with the shape, dtype and device of `like`.
    fn noise_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor>;
}

impl<F: FnMut(&Tensor) -> candle_core::Result<Tensor>> NoiseSource for F {
    fn noise_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        self(like)
    }
}

impl NoiseSource for crate::noise::SeededNoise {
    fn noise_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        self.randn(like.shape(), like.dtype(), like.device())
    }
}

/// A diffusers scheduler: the timestep schedule of a sampling run and the update from one
/// timestep to the next.
pub trait Scheduler: Send {
    /// Computes the schedule of a run of `num_inference_steps` (diffusers `set_timesteps`); resets
    /// the step counter and the solver history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps fed to the UNet, in order (diffusers `scheduler.timesteps`).
    fn timesteps(&self) -> &[f64];
    /// The standard deviation of the initial noise (multiply unit Gaussian latents by it).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// UNet evaluations per entry of `timesteps` (diffusers `scheduler.order`).
    fn order(&self) -> usize {
        1
    }
    /// Starts the run at `timesteps()[index]` (diffusers `set_begin_index`, used by img2img).
    fn set_begin_index(&mut self, index: usize);
    /// The UNet input for `sample` at `timestep` (by default `sample` itself).
    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One denoising step from `timestep`: returns the previous (less noisy) sample.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// Noises `original` to the level of `timestep` (img2img, inpainting, training).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;
}

/// diffusers' img2img rule (`StableDiffusionImg2ImgPipeline.get_timesteps`): how many of the
/// `timesteps()` to skip for a given strength; returns the start index into `timesteps()`
/// (already multiplied by `order`). Strength 1 starts at 0; strength 0 (or below) skips everything.
pub fn img2img_start_index(num_inference_steps: usize, strength: f64, order: usize) -> usize {
    // `as` truncates like Python's int() and saturates negative and NaN products to 0.
    let init_timestep = ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps);
    (num_inference_steps - init_timestep) * order
}

/// The step counter of the schedulers that walk their sigma table (diffusers `_step_index` /
/// `_begin_index`).
#[derive(Debug, Clone, Default)]
struct StepIndex {
    step: Option<usize>,
    begin: Option<usize>,
}

/// What `index_for_timestep` does with a timestep that is not in the schedule.
#[derive(Debug, Clone, Copy)]
enum Missing {
    /// An error (diffusers raises an `IndexError`).
    Fail,
    /// The last index (DPM-Solver and UniPC).
    Last,
}

impl StepIndex {
    fn reset(&mut self) {
        *self = Self::default();
    }

    /// The index of the current step, found from `timestep` on the first call (diffusers
    /// `_init_step_index`).
    fn current(&mut self, timesteps: &[f64], timestep: f64, missing: Missing) -> Result<usize> {
        if self.step.is_none() {
            self.step = Some(match self.begin {
                Some(begin) => begin,
                None => index_for_timestep(timesteps, timestep, missing)?,
            });
        }
        Ok(self.step.unwrap_or_default())
    }

    fn advance(&mut self) {
        self.step = self.step.map(|s| s + 1);
    }

    /// The step index `add_noise` uses for `timestep`.
    fn for_add_noise(&self, timesteps: &[f64], timestep: f64, missing: Missing) -> Result<usize> {
        match (self.begin, self.step) {
            (None, _) => index_for_timestep(timesteps, timestep, missing),
            (Some(_), Some(step)) => Ok(step),
            (Some(begin), None) => Ok(begin),
        }
    }
}

/// diffusers' `index_for_timestep`: the position of `timestep` in the schedule, the second one
/// when it occurs more than once (so img2img never skips a sigma).
fn index_for_timestep(timesteps: &[f64], timestep: f64, missing: Missing) -> Result<usize> {
    let mut found = timesteps.iter().enumerate().filter(|&(_, &t)| t == timestep).map(|(i, _)| i);
    match (found.next(), found.next(), missing) {
        (_, Some(second), _) => Ok(second),
        (Some(first), None, _) => Ok(first),
        (None, None, Missing::Last) => Ok(timesteps.len().saturating_sub(1)),
        (None, None, Missing::Fail) => {
            Err(DiffusionError::input("timestep", format!("{timestep} is not one of the scheduler's timesteps")))
        }
    }
}

/// The sigma at `index`, or an error when a run takes more steps than it has.
fn sigma_at(sigmas: &[f32], index: usize) -> Result<f32> {
    sigmas.get(index).copied().ok_or_else(|| {
        DiffusionError::input("timestep", format!("step {index} is past the end of the schedule; call set_timesteps"))
    })
}

/// A training timestep as an index into `alphas_cumprod`.
fn train_index(timestep: f64, num_train_timesteps: usize) -> Result<usize> {
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep >= num_train_timesteps as f64 {
        return Err(DiffusionError::input(
            "timestep",
            format!("{timestep} is not an integer training timestep in [0, {num_train_timesteps})"),
        ));
    }
    Ok(timestep as usize)
}

fn check_steps(num_inference_steps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(DiffusionError::input("num_inference_steps", "must be at least 1"));
    }
    Ok(())
}

/// The whole-number timesteps of DDIM and DDPM's `set_timesteps`.
fn training_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    check_steps(num_inference_steps)?;
    let train = num_train_timesteps;
    if num_inference_steps > train {
        return Err(DiffusionError::input(
            "num_inference_steps",
            format!("{num_inference_steps} is more than num_train_timesteps {train}"),
        ));
    }
    let spaced = spaced_timesteps(spacing, train, train, num_inference_steps, steps_offset, false);
    // numpy's arange can add a -1 under trailing spacing (e.g. 61 steps); diffusers would then
    // index alphas_cumprod[-1], the last training step. It is dropped here.
    Ok(spaced.into_iter().map(f64::round_ties_even).filter(|&t| t >= 0.0).collect())
}

/// The dtype the arithmetic runs in: float32, or float64 for float64 inputs.
fn work_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 { DType::F64 } else { DType::F32 }
}

fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(work_dtype(t.dtype()))?)
}

/// `t * c`.
fn mul(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(c as f64, 0.0)?)
}

/// `t / c` (a true division, as torch does it, not a multiplication by `1 / c`).
fn div(t: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&c)?)
}

/// Draws one noise tensor like `like` and checks what the source returned.
fn draw_noise(noise: &mut dyn NoiseSource, like: &Tensor) -> Result<Tensor> {
    let n = noise.noise_like(like)?;
    if n.dims() != like.dims() {
        return Err(DiffusionError::input("noise", format!("expected shape {:?}, got {:?}", like.dims(), n.dims())));
    }
    Ok(n.to_dtype(like.dtype())?.to_device(like.device())?)
}

/// The data prediction `x0` of `model_output` for a sample `alpha * x0 + sigma * eps`.
fn data_prediction(prediction: PredictionType, mo: &Tensor, x: &Tensor, alpha: f32, sigma: f32) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => div(&(x - mul(mo, sigma)?)?, alpha)?,
        PredictionType::Sample => mo.clone(),
        PredictionType::VPrediction => (mul(x, alpha)? - mul(mo, sigma)?)?,
    })
}

/// The noise prediction `eps` of `model_output` for a sample `alpha * x0 + sigma * eps`.
fn noise_prediction(prediction: PredictionType, mo: &Tensor, x: &Tensor, alpha: f32, sigma: f32) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => mo.clone(),
        PredictionType::Sample => div(&(x - mul(mo, alpha)?)?, sigma)?,
        PredictionType::VPrediction => (mul(mo, alpha)? + mul(x, sigma)?)?,
    })
}

/// `x` clamped to `[-range, range]` when `clip_sample` is set.
fn clip_sample(x: Tensor, clip_sample: bool, range: f64) -> Result<Tensor> {
    Ok(if clip_sample { x.clamp(-range, range)? } else { x })
}

/// The `add_noise` of DDPM, DDIM and LCM at one training timestep.
fn add_noise_at_timestep(alphas_cumprod: &[f32], original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
    add_noise_alphas(alphas_cumprod, original, noise, &[train_index(timestep, alphas_cumprod.len())?])
}

/// `sqrt(alphas_cumprod[t]) * original + sqrt(1 - alphas_cumprod[t]) * noise`, one timestep per
/// batch item.
fn add_noise_alphas(alphas_cumprod: &[f32], original: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
    let (sqrt_a, sqrt_b) = per_item_alphas(alphas_cumprod, original, timesteps)?;
    Ok((original.broadcast_mul(&sqrt_a)? + noise.broadcast_mul(&sqrt_b)?)?)
}

/// `[sqrt(ac[t]), sqrt(1 - ac[t])]` per batch item, shaped `[B, 1, ...]` in `like`'s dtype.
fn per_item_alphas(alphas_cumprod: &[f32], like: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
    let batch = like.dims().first().copied().unwrap_or(1);
    if timesteps.len() != 1 && timesteps.len() != batch {
        return Err(DiffusionError::input(
            "timesteps",
            format!("expected 1 or {batch} (one per batch item), got {}", timesteps.len()),
        ));
    }
    let mut a = Vec::with_capacity(timesteps.len());
    let mut b = Vec::with_capacity(timesteps.len());
    for &t in timesteps {
        let ac = *alphas_cumprod.get(t).ok_or_else(|| {
            DiffusionError::input("timesteps", format!("{t} is not below num_train_timesteps {}", alphas_cumprod.len()))
        })?;
        a.push(ac.sqrt());
        b.push((1.0 - ac).sqrt());
    }
    let mut shape = vec![timesteps.len()];
    shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
    let as_tensor = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape.as_slice(), like.device())?.to_dtype(like.dtype())?)
    };
    Ok((as_tensor(a)?, as_tensor(b)?))
}

/// The `add_noise` of DPM-Solver and UniPC: `alpha_t * original + sigma_t * noise` at the sigma
/// of `timestep`.
fn add_noise_alpha_sigma(
    index: &StepIndex,
    timesteps: &[f64],
    sigmas: &[f32],
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let i = index.for_add_noise(timesteps, timestep, Missing::Last)?;
    let (alpha_t, sigma_t) = alpha_sigma_t(sigma_at(sigmas, i)?);
    let (o, z) = (upcast(original)?, upcast(noise)?);
    Ok((mul(&o, alpha_t)? + mul(&z, sigma_t)?)?.to_dtype(original.dtype())?)
}

/// The last model outputs of a multistep solver (diffusers `model_outputs`), newest last.
#[derive(Debug, Clone)]
struct History(Vec<Option<Tensor>>);

impl History {
    fn new(solver_order: usize) -> Self {
        Self(vec![None; solver_order])
    }

    /// Stores `output` as the newest, dropping the oldest.
    fn push(&mut self, output: Tensor) {
        self.0.rotate_left(1);
        *self.0.last_mut().unwrap_or(&mut None) = Some(output);
    }

    /// The `k`-th newest stored output (1 = the newest).
    fn get(&self, k: usize) -> Result<&Tensor> {
        self.0[self.0.len() - k]
            .as_ref()
            .ok_or_else(|| DiffusionError::input("timestep", "a higher-order step needs the earlier steps of the run"))
    }
}

/// Refuses a `true` flag diffusers supports but these schedulers do not implement.
fn refuse_flag(class: &'static str, field: &str, value: bool, what: &str) -> Result<()> {
    if value {
        return Err(DiffusionError::config(class, field, format!("{what} is not implemented")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_for_timestep_takes_the_second_duplicate() {
        let t = [999.0, 500.0, 500.0, 0.0];
        assert_eq!(index_for_timestep(&t, 500.0, Missing::Fail).unwrap(), 2);
        assert_eq!(index_for_timestep(&t, 0.0, Missing::Fail).unwrap(), 3);
        assert_eq!(index_for_timestep(&t, 7.0, Missing::Last).unwrap(), 3);
        assert!(index_for_timestep(&t, 7.0, Missing::Fail).is_err());
    }
}
