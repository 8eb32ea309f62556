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
        // f32 CPU parameters: one parallel pass over all of them (the tensor-op form costs a
        // dozen single-threaded passes and allocations per parameter).
        let fused = |p: &Var, g: &Tensor| {
            [p.as_tensor(), g].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
        };
        let work: Vec<usize> = (0..params.len())
            .filter(|&i| grads.get(i).copied().flatten().is_some_and(|g| fused(params[i].0, g)))
            .collect();
        let updated = {
            use rayon::prelude::*;
            let moments = &self.moments;
            work.par_iter()
                .map(|&i| {
                    let (p, lr) = params[i];
                    let g = grads[i].expect("filtered above");
                    let hyper = Hyper { lr, bc1, bc2_sqrt, config: c };
                    fused_step(p.as_tensor(), g, &moments[i], hyper)
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        for (&i, [p_new, m_new, v_new]) in work.iter().zip(updated) {
            let p = params[i].0;
            let shape = p.shape().clone();
            self.moments[i] =
                (Tensor::from_vec(m_new, &shape, p.device())?, Tensor::from_vec(v_new, &shape, p.device())?);
            p.set(&Tensor::from_vec(p_new, &shape, p.device())?)?;
        }
        for (i, (((p, lr), g), (m, v))) in params.iter().zip(grads).zip(self.moments.iter_mut()).enumerate() {
            let Some(g) = g else { continue };
            if work.binary_search(&i).is_ok() {
                continue;
            }
            // candle's gradients of variables still reference the forward graph they came from;
            // moments built on them would keep every step's graph alive.
            let g = &g.detach();
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

/// The new `(parameter, m, v)` of one contiguous f32 CPU parameter, read in place, with the
/// tensor-op form's f32 operations in the same order (the results are identical).
fn fused_step(p: &Tensor, g: &Tensor, (m, v): &(Tensor, Tensor), h: Hyper) -> Result<[Vec<f32>; 3], LoraError> {
    let c = h.config;
    let (b1, b2) = (c.adam_beta1 as f32, c.adam_beta2 as f32);
    let (g1, g2) = ((1.0 - c.adam_beta1) as f32, (1.0 - c.adam_beta2) as f32);
    let decay = (1.0 - h.lr * c.adam_weight_decay) as f32;
    let (inv_bc2, eps, step) = ((1.0 / h.bc2_sqrt) as f32, c.adam_epsilon as f32, (h.lr / h.bc1) as f32);
    let (m, v) = (m.contiguous()?, v.contiguous()?);
    Ok(easyphoto_diffusion::cpu::with_f32s([p, g, &m, &v], |[p, g, m, v]| {
        let (mut pn, mut mn, mut vn) = (vec![0f32; p.len()], vec![0f32; p.len()], vec![0f32; p.len()]);
        let new = pn.iter_mut().zip(mn.iter_mut()).zip(vn.iter_mut());
        for (((pn, mn), vn), ((&p, &g), (&m, &v))) in new.zip(p.iter().zip(g).zip(m.iter().zip(v))) {
            *mn = m * b1 + g * g1;
            *vn = v * b2 + g * g * g2;
            *pn = p * decay - *mn / (vn.sqrt() * inv_bc2 + eps) * step;
        }
        Ok([pn, mn, vn])
    })?)
}

/// Scales `grads` so that their joint L2 norm is at most `max_norm` (by
/// `min(1, max_norm / (norm + 1e-6))`, as torch does) and returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, LoraError> {
    let mut sum = 0f64;
    // f32 CPU gradients in parallel, in place; the others through tensor ops.
    let fast: Vec<Option<f64>> = {
        use rayon::prelude::*;
        grads.par_iter().map(sum_of_squares).collect()
    };
    for (g, fast) in grads.iter().zip(fast) {
        sum += match fast {
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
    let sum = |data: &[f32]| data.chunks(16).map(|c| c.iter().map(|&x| f64::from(x * x)).sum::<f64>()).sum();
    easyphoto_diffusion::cpu::with_f32s([t], |[data]| Ok(sum(data))).ok()
}
