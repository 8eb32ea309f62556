//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay), and gradient-norm
//! clipping as `torch.nn.utils.clip_grad_norm_`; the moments can be saved and restored so that
//! a resumed run continues exactly.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::LoraError;

/// The hyper-parameters (EasyPhoto: betas 0.9 / 0.999, weight decay 1e-2, eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
    pub adam_epsilon: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { adam_beta1: 0.9, adam_beta2: 0.999, adam_weight_decay: 1e-2, adam_epsilon: 1e-8 }
    }
}

/// First and second moments of every parameter, and the number of steps taken.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    step: usize,
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    /// A fresh optimizer for `params`.
    pub fn new(config: AdamWConfig, params: &[&Var]) -> Result<Self, LoraError> {
        let moments = params
            .iter()
            .map(|p| Ok((p.as_tensor().zeros_like()?, p.as_tensor().zeros_like()?)))
            .collect::<Result<_, LoraError>>()?;
        Ok(Self { config, step: 0, moments })
    }

    /// An optimizer restored from saved moments after `step` steps.
    pub fn from_state(config: AdamWConfig, step: usize, moments: Vec<(Tensor, Tensor)>) -> Self {
        Self { config, step, moments }
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The moments `(exp_avg, exp_avg_sq)`, in parameter order.
    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }

    /// One step: for each parameter `p` with gradient `g` and learning rate `lr`,
    /// `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
    /// `p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)`.
    pub fn step(&mut self, params: &[(&Var, f64)], grads: &[Tensor]) -> Result<(), LoraError> {
        let grads: Vec<Option<&Tensor>> = grads.iter().map(Some).collect();
        self.step_partial(params, &grads)
    }

    /// [`AdamW::step`] where a parameter without a gradient (`None`: it did not reach the loss,
    /// as the last layer of SDXL's first text encoder) is left untouched, moments included, as
    /// torch does for a `None` grad. The step count `t` is shared by all parameters.
    pub fn step_partial(&mut self, params: &[(&Var, f64)], grads: &[Option<&Tensor>]) -> Result<(), LoraError> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.adam_beta1.powi(t);
        let bc2_sqrt = (1.0 - c.adam_beta2.powi(t)).sqrt();
        for (((p, lr), g), (m, v)) in params.iter().zip(grads).zip(self.moments.iter_mut()) {
            let Some(g) = g else { continue };
            // candle's gradients of variables still reference the forward graph they came from;
            // moments built on them would keep every step's graph alive.
            let g = &g.detach();
            let hyper = Hyper { lr: *lr, bc1, bc2_sqrt, config: c };
            if fused_step(p, g, (m, v), hyper)? {
                continue;
            }
            *m = ((m.affine(c.adam_beta1, 0.0)? + g.affine(1.0 - c.adam_beta1, 0.0)?)?).contiguous()?;
            *v = ((v.affine(c.adam_beta2, 0.0)? + g.sqr()?.affine(1.0 - c.adam_beta2, 0.0)?)?).contiguous()?;
            let decayed = p.as_tensor().detach().affine(1.0 - lr * c.adam_weight_decay, 0.0)?;
            let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, c.adam_epsilon)?;
            let update = (m.div(&denom)?).affine(lr / bc1, 0.0)?;
            p.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

/// One parameter's step size terms.
#[derive(Clone, Copy)]
struct Hyper {
    lr: f64,
    bc1: f64,
    bc2_sqrt: f64,
    config: AdamWConfig,
}

/// The step of one f32 CPU parameter in one pass over its values (the tensor-op form costs a
/// dozen single-threaded passes and allocations per parameter), with the same f32 operations in
/// the same order. `false` when it does not apply (another device or dtype).
fn fused_step(p: &Var, g: &Tensor, (m, v): (&mut Tensor, &mut Tensor), h: Hyper) -> Result<bool, LoraError> {
    use rayon::prelude::*;
    let all = [p.as_tensor(), g, &*m, &*v];
    if !all.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32) {
        return Ok(false);
    }
    let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (mut pv, gv, mut mv, mut vv) = (host(p.as_tensor())?, host(g)?, host(m)?, host(v)?);
    let c = h.config;
    let (b1, b2) = (c.adam_beta1 as f32, c.adam_beta2 as f32);
    let (g1, g2) = ((1.0 - c.adam_beta1) as f32, (1.0 - c.adam_beta2) as f32);
    let decay = (1.0 - h.lr * c.adam_weight_decay) as f32;
    let (inv_bc2, eps, step) = ((1.0 / h.bc2_sqrt) as f32, c.adam_epsilon as f32, (h.lr / h.bc1) as f32);
    const CHUNK: usize = 1 << 14;
    pv.par_chunks_mut(CHUNK)
        .zip(mv.par_chunks_mut(CHUNK))
        .zip(vv.par_chunks_mut(CHUNK))
        .zip(gv.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                *m = *m * b1 + g * g1;
                *v = *v * b2 + g * g * g2;
                *p = *p * decay - *m / (v.sqrt() * inv_bc2 + eps) * step;
            }
        });
    let shape = p.shape().clone();
    *m = Tensor::from_vec(mv, &shape, p.device())?;
    *v = Tensor::from_vec(vv, &shape, p.device())?;
    p.set(&Tensor::from_vec(pv, &shape, p.device())?)?;
    Ok(true)
}

/// Scales `grads` so that their joint L2 norm is at most `max_norm` (by
/// `min(1, max_norm / (norm + 1e-6))`, as torch does) and returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, LoraError> {
    let mut sum = 0f64;
    for g in grads.iter() {
        sum += match sum_of_squares(g) {
            Some(s) => s,
            None => f64::from(g.sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?.sqrt()).powi(2),
        };
    }
    let norm = sum.sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    // torch multiplies by the clamped coefficient even when it is 1, which changes nothing.
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.detach().affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

/// `Σ x²` of a contiguous f32 CPU tensor, accumulated in f64 (`None` for other tensors).
fn sum_of_squares(t: &Tensor) -> Option<f64> {
    let (storage, layout) = t.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return None;
    };
    Some(data[a..b].chunks(16).map(|c| c.iter().map(|&x| f64::from(x * x)).sum::<f64>()).sum())
}
