//! A frozen linear layer with one trainable low-rank term (a LoRA being trained),
//! `y = x (W + s·U·D)ᵀ + b`, as one op with its own backward.
//!
//! Composed from candle ops the term costs a dozen tensors per layer (two products, their
//! transposes, a scale, a sum, and in the backward the broadcast reductions and gradient
//! accumulations), most of them single-threaded. Here the forward and the backward are a few
//! matrix products on the CPU kernels' gemm, computed whichever of two ways does less work:
//!
//! - merged (many rows): `W' = W + s·U·D` is formed; `y = x W'ᵀ + b`; with the output gradient
//!   `G` and `M = Gᵀ·x` (`[out, in]`, what a full fine-tune would compute),
//!   `dU = s·M·Dᵀ`, `dD = s·Uᵀ·M`, `dx = G·W'`: two row-sized products each way, whatever the
//!   rank (EasyPhoto's rank 128 equals or exceeds the width of the smaller UNet levels);
//! - apart (few rows, such as the 77 text tokens of cross-attention keys): `H = x Dᵀ` is kept
//!   from the forward, `y = x Wᵀ + b + s·H·Uᵀ`, `dU = s·Gᵀ·H`, `dD = s·(G·U)ᵀ·x`,
//!   `dx = G·W + s·(G·U)·D`.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::gemm::{Dst, par_product, par_sgemm as sgemm};
use super::{Weights, f32_data, on_cpu, profile, with_f32s};

/// `x (W + scale·up·down)ᵀ + b` for `x` `[…, in]`, a frozen `weight` `[out, in]` (f32, f16 or
/// bf16) and `bias` `[out]`, and f32 `down` `[r, in]`, `up` `[out, r]`, when a gradient flows
/// through `x`, `down` or `up` (all on the CPU, `x` f32); `None` otherwise.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    down: &Tensor,
    up: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    let tracked = x.track_op() || down.track_op() || up.track_op();
    let frozen = !weight.track_op() && !bias.is_some_and(|b| b.track_op());
    let mut args = vec![x, weight, down, up];
    args.extend(bias);
    if !tracked || !frozen || !on_cpu(&args) || [x.dtype(), down.dtype(), up.dtype()] != [DType::F32; 3] {
        return Ok(None);
    }
    let (Ok((out, inp)), Ok((r, din)), Ok((uout, ur))) = (weight.dims2(), down.dims2(), up.dims2()) else {
        return Ok(None);
    };
    let f32_weight = matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if !f32_weight || x.dim(candle_core::D::Minus1)? != inp || din != inp || (uout, ur) != (out, r) {
        return Ok(None);
    }
    if bias.is_some_and(|b| b.dims() != [out]) {
        return Ok(None);
    }
    let _p = profile::scope_flops("linear+low-rank", 2.0 * (x.elem_count() / inp * (inp * out + inp * r)) as f64);
    let op = LowRankOp {
        weight: weight.contiguous()?,
        bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        scale: scale as f32,
        hidden: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(&down.contiguous()?, &up.contiguous()?, op)?))
}

#[derive(Debug)]
struct LowRankOp {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    /// `H = x Dᵀ` from a forward that kept the term apart, for `dU`.
    hidden: Mutex<Option<Vec<f32>>>,
}

/// Whether the merged form does fewer operations than the separate one (forward and backward
/// together) for `rows` rows of an `inp → out` layer of rank `r`.
fn merge(rows: usize, inp: usize, out: usize, r: usize) -> bool {
    let merged = 3 * rows * inp * out + 4 * out * inp * r;
    let apart = 2 * rows * inp * out + 3 * rows * r * (inp + out);
    merged < apart
}

/// `scale · m` for a small matrix.
fn scaled(m: &[f32], scale: f32) -> Vec<f32> {
    m.iter().map(|v| v * scale).collect()
}

impl LowRankOp {
    /// Calls `f` with the frozen weight as f32 `[out, in]` (borrowed when it is f32), plus
    /// `s·U·D` when `merged`.
    fn with_weight<R>(
        &self,
        up: &[f32],
        down: &[f32],
        (out, inp, r): (usize, usize, usize),
        merged: bool,
        f: impl FnOnce(&[f32]) -> Result<R>,
    ) -> Result<R> {
        let (storage, layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            candle_core::bail!("linear+low-rank: weight not on the CPU")
        };
        let w = Weights::of(s, layout)?.to_f32();
        if merged {
            f(&super::rank_update::add_product(&w, &scaled(up, self.scale), down, (out, inp, r), true))
        } else {
            f(&w)
        }
    }
}

impl CustomOp3 for LowRankOp {
    fn name(&self) -> &'static str {
        "easyphoto-linear-low-rank"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, down, up) = (f32_data(xs, xl)?, f32_data(ds, dl)?, f32_data(us, ul)?);
        let ((r, inp), (out, _)) = (dl.shape().dims2()?, ul.shape().dims2()?);
        let rows = x.len() / inp.max(1);
        let merged = merge(rows, inp, out, r);
        // SAFETY (all products): each buffer holds the rows × columns its strides address.
        let mut y = self.with_weight(up, down, (out, inp, r), merged, |w| {
            let (x_, w_t) = ((x.as_ptr(), inp, 1), (w.as_ptr(), 1, inp));
            match &self.bias {
                Some(b) => with_f32s([b], |[b]| Ok(unsafe { par_product((rows, out, inp), Dst::Bias(b), x_, w_t) })),
                None => Ok(unsafe { par_product((rows, out, inp), Dst::Overwrite, x_, w_t) }),
            }
        })?;
        if !merged {
            let us = scaled(up, self.scale);
            let h =
                unsafe { par_product((rows, r, inp), Dst::Overwrite, (x.as_ptr(), inp, 1), (down.as_ptr(), 1, inp)) };
            unsafe {
                sgemm((rows, out, r), y.as_mut_ptr(), out, Dst::Accumulate, (h.as_ptr(), r, 1), (us.as_ptr(), 1, r))
            };
            *self.hidden.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        }
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = profile::scope("linear+low-rank backward");
        let ((r, inp), (out, _)) = (down.dims2()?, up.dims2()?);
        let rows = x.elem_count() / inp.max(1);
        let grad = grad.detach().to_dtype(DType::F32)?.contiguous()?;
        let saved = self.hidden.lock().unwrap_or_else(|e| e.into_inner()).take();
        let merged = merge(rows, inp, out, r);
        with_f32s([x, down, up, &grad], |[xd, dd, ud, g]| {
            let (g_, g_t, x_) = ((g.as_ptr(), out, 1), (g.as_ptr(), 1, out), (xd.as_ptr(), inp, 1));
            // SAFETY (all products): each buffer holds what its strides address.
            let (mut d_down, mut d_up, dx) = if merged {
                let m = unsafe { par_product((out, inp, rows), Dst::Overwrite, g_t, x_) };
                let m_ = (m.as_ptr(), inp, 1);
                let d_up = unsafe { par_product((out, r, inp), Dst::Overwrite, m_, (dd.as_ptr(), 1, inp)) };
                let d_down = unsafe { par_product((r, inp, out), Dst::Overwrite, (ud.as_ptr(), 1, r), m_) };
                let dx = if x.track_op() {
                    Some(self.with_weight(ud, dd, (out, inp, r), true, |w| {
                        Ok(unsafe { par_product((rows, inp, out), Dst::Overwrite, g_, (w.as_ptr(), inp, 1)) })
                    })?)
                } else {
                    None
                };
                (d_down, d_up, dx)
            } else {
                let h = match saved {
                    Some(h) => h,
                    None => unsafe { par_product((rows, r, inp), Dst::Overwrite, x_, (dd.as_ptr(), 1, inp)) },
                };
                // s·G·U, then dD = (s·G·U)ᵀ·x, dU = Gᵀ·H (scaled below), dx = (s·G·U)·D + G·W.
                let mut gu = unsafe { par_product((rows, r, out), Dst::Overwrite, g_, (ud.as_ptr(), r, 1)) };
                gu.iter_mut().for_each(|v| *v *= self.scale);
                let d_down = unsafe { par_product((r, inp, rows), Dst::Overwrite, (gu.as_ptr(), 1, r), x_) };
                let d_up = unsafe { par_product((out, r, rows), Dst::Overwrite, g_t, (h.as_ptr(), r, 1)) };
                let dx = if x.track_op() {
                    let (gu_, d_) = ((gu.as_ptr(), r, 1), (dd.as_ptr(), inp, 1));
                    let mut dx = unsafe { par_product((rows, inp, r), Dst::Overwrite, gu_, d_) };
                    self.with_weight(ud, dd, (out, inp, r), false, |w| {
                        let w_ = (w.as_ptr(), inp, 1);
                        unsafe { sgemm((rows, inp, out), dx.as_mut_ptr(), inp, Dst::Accumulate, g_, w_) };
                        Ok(())
                    })?;
                    Some(dx)
                } else {
                    None
                };
                (d_down, d_up, dx)
            };
            if merged {
                d_down.iter_mut().for_each(|v| *v *= self.scale);
            }
            d_up.iter_mut().for_each(|v| *v *= self.scale);
            Ok((
                dx.map(|dx| Tensor::from_vec(dx, x.shape(), x.device())).transpose()?,
                Some(Tensor::from_vec(d_down, (r, inp), down.device())?),
                Some(Tensor::from_vec(d_up, (out, r), up.device())?),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Output and gradients against candle's composition, with the product formed (many rows)
    /// and kept apart (few rows), for tracked and untracked inputs and half weights.
    #[test]
    fn matches_the_composition() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (rows, inp, out, r, track_x, dtype) in [
            (300, 24, 40, 8, true, DType::F32),
            (5, 48, 32, 16, true, DType::F32),
            (77, 64, 16, 4, false, DType::F32),
            (200, 16, 24, 8, true, DType::F16),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, rows, inp), &dev)?)?;
            let down = Var::from_tensor(&Tensor::randn(0f32, 0.3, (r, inp), &dev)?)?;
            let up = Var::from_tensor(&Tensor::randn(0f32, 0.3, (out, r), &dev)?)?;
            let w = Tensor::randn(0f32, 0.3, (out, inp), &dev)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1.0, out, &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (2, rows, out), &dev)?;
            let xin = if track_x { x.as_tensor().clone() } else { x.as_tensor().detach() };
            let ours = super::linear(&xin, &w, Some(&b), &down, &up, 0.7)?.expect("applies");
            let w32 = w.to_dtype(DType::F32)?;
            let plain = (xin.broadcast_matmul(&w32.t()?)?.broadcast_add(&b)?
                + (xin.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)? * 0.7)?)?;
            assert!(max_abs(&ours, &plain) < 1e-4, "forward {rows}x{inp}->{out}");
            let (g1, g2) = ((&ours * &wt)?.sum_all()?.backward()?, (&plain * &wt)?.sum_all()?.backward()?);
            for (name, var) in [("down", &down), ("up", &up), ("x", &x)] {
                match (g1.get(var), g2.get(var)) {
                    (Some(a), Some(b)) => {
                        let err = max_abs(a, b);
                        assert!(err < 1e-3, "{name} {rows}x{inp}->{out}: {err}");
                    }
                    (None, None) => assert!(!track_x && name == "x"),
                    _ => panic!("{name}: a gradient on one side only"),
                }
            }
        }
        Ok(())
    }
}
