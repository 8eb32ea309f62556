//! Control units as the WebUI's sd-webui-controlnet and diffusers apply them: each unit runs its
//! ControlNet on the step's latent input, its residuals are scaled by the unit's weight and
//! control mode, and the residuals of all active units are summed. [`Controls`] hands the sum to
//! the diffusion crate's sampling loops through its `ResidualProvider` hook.

use std::sync::Arc;

use candle_core::Tensor;
use easyphoto_diffusion::DiffusionError;
use easyphoto_diffusion::sampling::{ResidualProvider, Residuals, StepInput};
use easyphoto_diffusion::unet_2d_condition::UNetConditioning;

use crate::{ControlNetError, ControlNetModel};

/// How a unit's residuals are weighted and which classifier-free-guidance branch receives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlMode {
    /// WebUI "Balanced": every residual scaled by the weight, both branches (diffusers' default).
    #[default]
    Balanced,
    /// WebUI "My prompt is more important": residual `i` (down residuals, then the mid residual
    /// last) scaled by `weight · 0.825^(12 − i)`, both branches. For SD 1.5's 13 residuals the mid
    /// block gets the full weight; SDXL's 10 take the first 10 factors (mid: `0.825^3`).
    PromptMoreImportant,
    /// WebUI "ControlNet is more important": the same soft weights, on the conditional branch only.
    ControlNetMoreImportant,
    /// diffusers' `guess_mode`: residual `i` of `n` scaled by `weight · 10^(−1 + i/(n − 1))`
    /// (`torch.logspace(-1, 0, n)`), conditional branch only.
    GuessMode,
}

impl ControlMode {
    /// The scale of each of `n` residuals (down residuals then mid) for a unit of weight `weight`.
    pub fn scales(self, weight: f64, n: usize) -> Vec<f64> {
        match self {
            Self::Balanced => vec![weight; n],
            Self::PromptMoreImportant | Self::ControlNetMoreImportant => {
                (0..n).map(|i| weight * 0.825f64.powi(12 - i as i32)).collect()
            }
            Self::GuessMode => (0..n).map(|i| weight * f64::from(logspace_point(i, n))).collect(),
        }
    }

    /// Whether only the conditional (positive-prompt) branch receives the residuals.
    pub fn conditional_only(self) -> bool {
        matches!(self, Self::ControlNetMoreImportant | Self::GuessMode)
    }
}

/// Point `i` of `torch.logspace(-1, 0, n)` as torch computes it in float32: the linspace
/// exponent (from the nearer end), then `10^x`.
fn logspace_point(i: usize, n: usize) -> f32 {
    if n < 2 {
        return 0.1;
    }
    let step = 1.0f32 / (n - 1) as f32;
    let x = if i < n / 2 { -1.0 + step * i as f32 } else { 0.0 - step * (n - 1 - i) as f32 };
    10f32.powf(x)
}

/// One ControlNet with its conditioning image and settings.
#[derive(Debug, Clone)]
pub struct ControlUnit {
    pub model: Arc<ControlNetModel>,
    /// The conditioning image `[1 or B, C, H, W]`, values in [0, 1], at the generated image's size.
    pub image: Tensor,
    pub weight: f64,
    /// The fraction of the steps at which the unit starts and stops acting.
    pub guidance_start: f64,
    pub guidance_end: f64,
    pub mode: ControlMode,
}

impl ControlUnit {
    /// A unit at weight 1 over all steps, balanced.
    pub fn new(model: Arc<ControlNetModel>, image: Tensor) -> Self {
        Self { model, image, weight: 1.0, guidance_start: 0.0, guidance_end: 1.0, mode: ControlMode::Balanced }
    }

    /// Whether the unit acts at step `step` (0-based) of `total`: diffusers' rule, off when
    /// `step / total < guidance_start` or `(step + 1) / total > guidance_end`. (The WebUI compares
    /// `step / total` with both ends; the two agree on the full window EasyPhoto uses, and differ
    /// by at most the last step of a window that ends early.)
    pub fn is_active(&self, step: usize, total: usize) -> bool {
        let total = total.max(1) as f64;
        !((step as f64) / total < self.guidance_start || (step as f64 + 1.0) / total > self.guidance_end)
    }
}

/// Scales `residuals` by `mode`'s factors for `weight` and, for conditional-only modes under
/// guidance, puts them on the conditional half of an `[uncond; cond]` batch (zeros for the
/// unconditional half). `residuals` are those of the rows that receive them: the conditional
/// rows only when `mode` is conditional-only and `guided`, every row otherwise.
pub fn apply_mode(
    residuals: &Residuals,
    mode: ControlMode,
    weight: f64,
    guided: bool,
) -> candle_core::Result<Residuals> {
    let n = residuals.down.len() + 1;
    let scales = mode.scales(weight, n);
    let place = |r: &Tensor, scale: f64| -> candle_core::Result<Tensor> {
        let scaled = (r * scale)?;
        if guided && mode.conditional_only() { Tensor::cat(&[&scaled.zeros_like()?, &scaled], 0) } else { Ok(scaled) }
    };
    let down = residuals.down.iter().zip(&scales).map(|(r, &s)| place(r, s)).collect::<candle_core::Result<_>>()?;
    Ok(Residuals { down, mid: place(&residuals.mid, scales[n - 1])? })
}

/// Adds `b` to `a` residual by residual.
pub fn add_residuals(a: &Residuals, b: &Residuals) -> candle_core::Result<Residuals> {
    let down = a.down.iter().zip(&b.down).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?;
    Ok(Residuals { down, mid: (&a.mid + &b.mid)? })
}

/// The control units of one generation, as the sampling loops' residual provider.
#[derive(Debug)]
pub struct Controls {
    units: Vec<ControlUnit>,
    /// Each unit's encoded conditioning image, computed at its first use.
    hints: Vec<Option<Tensor>>,
}

impl Controls {
    pub fn new(units: Vec<ControlUnit>) -> Self {
        let hints = vec![None; units.len()];
        Self { units, hints }
    }

    pub fn units(&self) -> &[ControlUnit] {
        &self.units
    }

    /// The residuals of every active unit at this step, scaled and summed; `None` when no unit
    /// is active.
    pub fn step_residuals(&mut self, input: &StepInput) -> Result<Option<Residuals>, ControlNetError> {
        let mut total: Option<Residuals> = None;
        for (unit, hint) in self.units.iter().zip(self.hints.iter_mut()) {
            if !unit.is_active(input.step, input.total) {
                continue;
            }
            let hint = match hint {
                Some(h) => h.clone(),
                None => hint.insert(unit.model.embed_condition(&unit.image)?).clone(),
            };
            let cond_rows = input.guided && unit.mode.conditional_only();
            let residuals = run_unit(&unit.model, &hint, input, cond_rows)?;
            let scaled = apply_mode(&residuals, unit.mode, unit.weight, input.guided)?;
            total = Some(match total {
                Some(sum) => add_residuals(&sum, &scaled)?,
                None => scaled,
            });
        }
        Ok(total)
    }
}

/// Runs `model` on the step's batch, or on its conditional half when `cond_rows`.
fn run_unit(
    model: &ControlNetModel,
    hint: &Tensor,
    input: &StepInput,
    cond_rows: bool,
) -> Result<Residuals, ControlNetError> {
    let rows = |t: &Tensor| -> candle_core::Result<Tensor> {
        if cond_rows { t.narrow(0, input.batch, input.batch) } else { Ok(t.clone()) }
    };
    let sample = rows(input.sample)?;
    let context = rows(input.context)?;
    let text_embeds = input.conditioning.text_embeds.map(rows).transpose()?;
    let time_ids = input.conditioning.time_ids.map(rows).transpose()?;
    let cond =
        UNetConditioning { text_embeds: text_embeds.as_ref(), time_ids: time_ids.as_ref(), ..Default::default() };
    let needed = sample.dim(0)?;
    let hint = match hint.dim(0)? {
        n if n == needed => hint.clone(),
        n if n > 0 && needed % n == 0 => Tensor::cat(&vec![hint; needed / n], 0)?,
        n => {
            return Err(ControlNetError::InvalidInput {
                field: "image",
                reason: format!("batch {n} does not divide the sampler's batch {needed}"),
            });
        }
    };
    let timestep = Tensor::new(&[input.timestep as f32], sample.device())?;
    model.forward_embedded(&sample, &timestep, &context, &hint, &cond)
}

impl ResidualProvider for Controls {
    fn residuals(&mut self, input: &StepInput) -> easyphoto_diffusion::Result<Option<Residuals>> {
        self.step_residuals(input).map_err(|e| match e {
            ControlNetError::Diffusion(d) => d,
            ControlNetError::Candle(c) => DiffusionError::Candle(c),
            other => DiffusionError::InvalidInput { name: "controlnet", message: other.to_string() },
        })
    }
}
