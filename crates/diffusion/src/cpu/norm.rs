//! Group normalisation with an optional fused SiLU: one pass for the statistics and one for
//! `act(x · scale_c + shift_c)` per channel, in parallel over (image, group). candle's
//! `GroupNorm` takes about six passes (reshape, mean, subtract, square, mean, divide, then the
//! affine and the activation as separate tensors).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::simd::{multiversion, silu};
use super::{f32_data, on_cpu, profile};
use crate::layers::Activation;

/// diffusers `nn.GroupNorm` (affine): loads `weight` and `bias` `[channels]` like
/// `candle_nn::group_norm`, and can apply the following activation in the same pass.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels")
        }
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self { weight, bias, groups, eps })
    }

    /// `act(group_norm(x))` (`act: None`: the norm alone); `x` is `[B, C, …]`.
    pub fn forward_act(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let silu = act == Some(Activation::Silu);
        let _p = profile::scope(if silu { "group_norm+silu" } else { "group_norm" });
        let channels = self.weight.dim(0)?;
        let frozen = !self.weight.track_op() && !self.bias.track_op();
        if on_cpu(&[x, &self.weight, &self.bias])
            && frozen
            && [x.dtype(), self.weight.dtype(), self.bias.dtype()] == [DType::F32; 3]
            && x.rank() >= 3
            && x.dim(1)? == channels
            && (act.is_none() || silu)
        {
            let op = GroupNormOp { groups: self.groups, eps: self.eps, silu };
            let x = x.contiguous()?;
            // With a gradient to the input (LoRA training), the op's own backward.
            return if x.track_op() {
                x.apply_op3(&self.weight, &self.bias, op)
            } else {
                x.apply_op3_no_bwd(&self.weight, &self.bias, &op)
            };
        }
        let gn = candle_nn::GroupNorm::new(self.weight.clone(), self.bias.clone(), channels, self.groups, self.eps)?;
        let y = gn.forward(x)?;
        match act {
            Some(act) => act.forward(&y),
            None => Ok(y),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }
}

/// The kernel as a candle op on `(x [B, C, …], weight [C], bias [C])`, contiguous f32.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    /// Apply SiLU to the result.
    pub silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "easyphoto-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xl.dims();
        let (b, c) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let (x, w, bias) = (f32_data(xs, xl)?, f32_data(ws, wl)?, f32_data(bs, bl)?);
        if w.len() != c || bias.len() != c || !c.is_multiple_of(self.groups) {
            candle_core::bail!("group norm: input {dims:?}, weight {:?}, {} groups", wl.dims(), self.groups)
        }
        let cg = c / self.groups;
        let mut out = Vec::with_capacity(x.len());
        if !x.is_empty() {
            out.spare_capacity_mut()[..x.len()]
                .par_chunks_mut(cg * spatial)
                .zip(x.par_chunks(cg * spatial))
                .enumerate()
                .for_each(|(i, (dst, src))| {
                    let c0 = (i % self.groups) * cg;
                    group(src, dst, &w[c0..c0 + cg], &bias[c0..c0 + cg], spatial, self.eps as f32, self.silu);
                });
        }
        // SAFETY: `group` wrote all `cg · spatial` values of every chunk, and the chunks tile
        // `x.len()` (`c` is a multiple of the group count).
        unsafe { out.set_len(x.len()) };
        let _ = b;
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Applied with a backward only when the affine parameters are frozen.
        let dx = super::norm_backward::group_norm_grad(x, grad, weight, bias, self.groups, self.eps, self.silu)?;
        Ok((Some(dx), None, None))
    }
}

multiversion! {
    /// Normalises one group (`w.len()` channels of `spatial` values each).
    fn group(src: &[f32], dst: &mut [MaybeUninit<f32>], w: &[f32], b: &[f32], spatial: usize, eps: f32, act: bool) {
        let (mean, var) = moments(src);
        let rstd = 1.0 / (var + eps).sqrt();
        for ((s, d), (&wc, &bc)) in src.chunks_exact(spatial).zip(dst.chunks_exact_mut(spatial)).zip(w.iter().zip(b)) {
            let scale = wc * rstd;
            let shift = bc - mean * scale;
            if act {
                for (d, &v) in d.iter_mut().zip(s) {
                    d.write(silu(v * scale + shift));
                }
            } else {
                for (d, &v) in d.iter_mut().zip(s) {
                    d.write(v * scale + shift);
                }
            }
        }
    }
}

/// Mean and (biased) variance in one pass: sums of `x - k` and `(x - k)²` with `k` the mean of
/// the first values (so that the variance does not cancel), 16 f32 lanes per 4096-value block,
/// blocks added in f64.
#[inline(always)]
pub(super) fn moments(x: &[f32]) -> (f32, f32) {
    if x.is_empty() {
        return (0.0, 0.0);
    }
    let head = &x[..x.len().min(256)];
    let k = (head.iter().map(|&v| v as f64).sum::<f64>() / head.len() as f64) as f32;
    let (mut s1, mut s2) = (0f64, 0f64);
    for block in x.chunks(4096) {
        let (mut a1, mut a2) = ([0f32; 16], [0f32; 16]);
        let chunks = block.chunks_exact(16);
        for &v in chunks.remainder() {
            let d = (v - k) as f64;
            s1 += d;
            s2 += d * d;
        }
        for c in chunks {
            for ((a1, a2), &v) in a1.iter_mut().zip(a2.iter_mut()).zip(c) {
                let d = v - k;
                *a1 += d;
                *a2 += d * d;
            }
        }
        s1 += a1.iter().map(|&a| a as f64).sum::<f64>();
        s2 += a2.iter().map(|&a| a as f64).sum::<f64>();
    }
    let n = x.len() as f64;
    let d_mean = s1 / n;
    ((k as f64 + d_mean) as f32, (s2 / n - d_mean * d_mean).max(0.0) as f32)
}
