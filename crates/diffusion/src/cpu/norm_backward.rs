//! The input gradients of the normalisations with frozen affine parameters (LoRA training): group
//! norm (with its optional SiLU) and layer norm, each in two passes over a group or row. candle's
//! differentiable compositions take about ten single-threaded tensor ops each way.
//!
//! With `x̂ = (x − μ)·r` (`r = 1/√(σ² + ε)`), `y = x̂·γ + β` and the gradient `dy` (through the
//! SiLU's derivative when there is one), over the `n` values of a group or row:
//! `dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` with `dx̂ = dy·γ`.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::norm::moments;
use super::simd::{exp, multiversion};
use super::{f32_data, on_cpu, profile};

/// The gradient of a group norm (`groups`, `eps`, then SiLU when `silu`) with respect to its
/// input `x` `[B, C, …]`, from `x` and the output gradient.
pub(super) fn group_norm_grad(
    x: &Tensor,
    grad: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let _p = profile::scope(if silu { "group_norm+silu backward" } else { "group_norm backward" });
    let op = NormBackward { weight: weight.to_vec1()?, bias: bias.to_vec1()?, groups, eps: eps as f32, silu };
    x.contiguous()?.apply_op2_no_bwd(&grad.detach().contiguous()?, &op)
}

/// Layer norm over the last dimension with a frozen `weight` and `bias`, as an op with its own
/// backward, for an f32 CPU input that needs a gradient; `None` otherwise.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let frozen = !weight.track_op() && !bias.track_op();
    let c = weight.dims1()?;
    if !frozen || !on_cpu(&[x, weight, bias]) || [x.dtype(), weight.dtype(), bias.dtype()] != [DType::F32; 3] {
        return Ok(None);
    }
    if x.dims().last() != Some(&c) || bias.dims() != [c] {
        return Ok(None);
    }
    let op = LayerNormOp { weight: weight.to_vec1()?, bias: bias.to_vec1()?, eps: eps as f32 };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// Layer norm with a frozen affine, forward and backward.
#[derive(Debug, Clone)]
struct LayerNormOp {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "easyphoto-layer-norm-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        let mut out = vec![0f32; x.len()];
        super::layer_norm::layer_norm(x, &self.weight, &self.bias, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _p = profile::scope("layer_norm backward");
        // A layer norm is a group norm of one group over `C` channels of one value each, but
        // with the affine per value: its own rows.
        let op = NormBackward { weight: self.weight.clone(), bias: vec![], groups: 0, eps: self.eps, silu: false };
        Ok(Some(x.apply_op2_no_bwd(&grad.detach().contiguous()?, &op)?))
    }
}

/// The input gradient of a group norm (`groups > 0`, input `[B, C, …]`) or of a layer norm
/// (`groups == 0`, rows of `weight.len()` values), as an op on `(x, grad)`.
struct NormBackward {
    weight: Vec<f32>,
    bias: Vec<f32>,
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "easyphoto-norm-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_data(xs, xl)?, f32_data(gs, gl)?);
        let c = self.weight.len();
        if x.len() != g.len() || c == 0 || !x.len().is_multiple_of(c) {
            candle_core::bail!("norm backward: input {:?}, gradient {:?}, {c} channels", xl.dims(), gl.dims())
        }
        let mut out = Vec::with_capacity(x.len());
        let dst = &mut out.spare_capacity_mut()[..x.len()];
        if self.groups == 0 {
            let rows = (16384 / c).max(1) * c;
            dst.par_chunks_mut(rows).zip(x.par_chunks(rows).zip(g.par_chunks(rows))).for_each(|(d, (x, g))| {
                for ((d, x), g) in d.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(g.chunks_exact(c)) {
                    row_backward(x, g, d, &self.weight, self.eps);
                }
            });
        } else {
            if xl.dims().get(1) != Some(&c) || !c.is_multiple_of(self.groups) {
                candle_core::bail!("group norm backward: input {:?}, {c} channels, {} groups", xl.dims(), self.groups)
            }
            let cg = c / self.groups;
            let spatial = x.len() / (xl.dims()[0] * c).max(1);
            dst.par_chunks_mut(cg * spatial)
                .zip(x.par_chunks(cg * spatial).zip(g.par_chunks(cg * spatial)))
                .enumerate()
                .for_each(|(i, (d, (x, g)))| {
                    let c0 = (i % self.groups) * cg;
                    let (w, b) = (&self.weight[c0..c0 + cg], &self.bias[c0..c0 + cg]);
                    group_backward(x, g, d, w, b, spatial, self.eps, self.silu);
                });
        }
        // SAFETY: every group or row of the output was written.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// 16 lane-wise partial sums of `f(i)` over `0..n`, added up (so that the sums vectorise).
#[inline(always)]
fn lane_sums(n: usize, f: impl Fn(usize) -> (f32, f32)) -> (f32, f32) {
    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
    let full = n / 16 * 16;
    for base in (0..full).step_by(16) {
        for l in 0..16 {
            let (x, y) = f(base + l);
            a[l] += x;
            b[l] += y;
        }
    }
    let (mut sa, mut sb) = (a.iter().sum::<f32>(), b.iter().sum::<f32>());
    for i in full..n {
        let (x, y) = f(i);
        sa += x;
        sb += y;
    }
    (sa, sb)
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    /// One group: `w.len()` channels of `spatial` values; `dst` takes `dx̂` and then `dx`.
    fn group_backward(x: &[f32], g: &[f32], dst: &mut [MaybeUninit<f32>], w: &[f32], b: &[f32], spatial: usize, eps: f32, act: bool) {
        let (mean, var) = moments(x);
        let r = 1.0 / (var + eps).sqrt();
        let n = x.len() as f32;
        let (mut sum_d, mut sum_dx) = (0f32, 0f32);
        for (ch, (&wc, &bc)) in w.iter().zip(b).enumerate() {
            let (xs, gs) = (&x[ch * spatial..][..spatial], &g[ch * spatial..][..spatial]);
            let ds = &mut dst[ch * spatial..][..spatial];
            for ((d, &xv), &gv) in ds.iter_mut().zip(xs).zip(gs) {
                let xh = (xv - mean) * r;
                let dy = if act {
                    let y = xh * wc + bc;
                    let s = 1.0 / (1.0 + exp(-y));
                    gv * s * (1.0 + y * (1.0 - s))
                } else {
                    gv
                };
                d.write(dy * wc);
            }
            // SAFETY: written just above.
            let ds: &[f32] = unsafe { std::slice::from_raw_parts(ds.as_ptr().cast(), spatial) };
            let (a, bsum) = lane_sums(spatial, |i| (ds[i], ds[i] * (xs[i] - mean) * r));
            sum_d += a;
            sum_dx += bsum;
        }
        let (ma, mb) = (sum_d / n, sum_dx / n);
        for (d, &xv) in dst.iter_mut().zip(x) {
            // SAFETY: every value holds `dx̂` from the pass above.
            let dxh = unsafe { d.assume_init_read() };
            d.write(r * (dxh - ma - (xv - mean) * r * mb));
        }
    }
}

multiversion! {
    /// One layer-norm row (`w.len()` values, affine per value).
    fn row_backward(x: &[f32], g: &[f32], dst: &mut [MaybeUninit<f32>], w: &[f32], eps: f32) {
        let n = x.len() as f32;
        let (sum, _) = lane_sums(x.len(), |i| (x[i], 0.0));
        let mean = sum / n;
        let (var, _) = lane_sums(x.len(), |i| ((x[i] - mean) * (x[i] - mean), 0.0));
        let r = 1.0 / (var / n + eps).sqrt();
        let (a, b) = lane_sums(x.len(), |i| {
            let dxh = g[i] * w[i];
            (dxh, dxh * (x[i] - mean) * r)
        });
        let (ma, mb) = (a / n, b / n);
        for (((d, &xv), &gv), &wv) in dst.iter_mut().zip(x).zip(g).zip(w) {
            d.write(r * (gv * wv - ma - (xv - mean) * r * mb));
        }
    }
}
