//! The spatial transformer's 1×1 projections with the layout change folded in: `proj_in` reads
//! the NCHW map and writes `[B, H·W, C]` tokens, `proj_out` reads tokens and writes the NCHW map.
//! The matrix product takes the transposed operand through its strides, so neither permuted copy
//! (a single-threaded strided copy in candle) is made.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{SendPtr, Weights, f32_data, gemm::sgemm, gemm_dtypes, inference, linear::grid, profile, threads};

/// `proj_in`: the 1×1 convolution of `x` `[B, C_in, H, W]` returned as tokens `[B, H·W, C_out]`;
/// `None` where the kernel does not apply (then: convolution, permute, reshape).
pub fn conv1x1_to_tokens(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some((weight, bias)) = prepare(x, weight, bias)? else { return Ok(None) };
    let (b, c, h, w) = x.dims4()?;
    if c != weight.dim(1)? {
        return Ok(None);
    }
    let _p = profile::scope_flops("conv1x1 (to tokens)", 2.0 * (x.elem_count() * weight.dim(0)?) as f64);
    let op = Pointwise { to_tokens: true, hw: (h, w) };
    let x32 = x.to_dtype(DType::F32)?.contiguous()?.reshape((b, c, h * w))?;
    Ok(Some(x32.apply_op3_no_bwd(&weight, &bias, &op)?.to_dtype(x.dtype())?))
}

/// `proj_out`: the 1×1 convolution of the map whose `[B, H·W, C_in]` tokens are `tokens`,
/// returned as `[B, C_out, H, W]`; `None` where the kernel does not apply.
pub fn conv1x1_from_tokens(
    tokens: &Tensor,
    (h, w): (usize, usize),
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Some((weight, bias)) = prepare(tokens, weight, bias)? else { return Ok(None) };
    let (_, n, c) = tokens.dims3()?;
    if c != weight.dim(1)? || n != h * w {
        return Ok(None);
    }
    let _p = profile::scope_flops("conv1x1 (from tokens)", 2.0 * (tokens.elem_count() * weight.dim(0)?) as f64);
    let op = Pointwise { to_tokens: false, hw: (h, w) };
    let y = tokens.to_dtype(DType::F32)?.contiguous()?.apply_op3_no_bwd(&weight, &bias, &op)?;
    Ok(Some(y.to_dtype(tokens.dtype())?))
}

/// The weight as `[C_out, C_in]` and the bias (zeros when absent), or `None` if the kernel
/// does not apply.
fn prepare(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<(Tensor, Tensor)>> {
    let mut args = vec![x, weight];
    args.extend(bias);
    if !inference(&args) || !gemm_dtypes(x, weight) || weight.rank() != 4 {
        return Ok(None);
    }
    let (cout, cin, kh, kw) = weight.dims4()?;
    if (kh, kw) != (1, 1) {
        return Ok(None);
    }
    let bias = match bias {
        Some(b) if b.dims() == [cout] => b.to_dtype(DType::F32)?.contiguous()?,
        Some(_) => return Ok(None),
        None => Tensor::zeros(cout, DType::F32, x.device())?,
    };
    Ok(Some((weight.reshape((cout, cin))?.contiguous()?, bias)))
}

/// The projection as a candle op on `(x, weight [C_out, C_in], bias [C_out])`: `x` is the map
/// `[B, C_in, H·W]` (`to_tokens`) or the tokens `[B, H·W, C_in]`.
#[derive(Debug, Clone, Copy)]
pub struct Pointwise {
    pub to_tokens: bool,
    pub hw: (usize, usize),
}

impl CustomOp3 for Pointwise {
    fn name(&self) -> &'static str {
        "easyphoto-pointwise"
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
        let (cout, cin) = wl.shape().dims2()?;
        let (bsz, d1, d2) = xl.shape().dims3()?;
        let pixels = self.hw.0 * self.hw.1;
        let expected = if self.to_tokens { (cin, pixels) } else { (pixels, cin) };
        if (d1, d2) != expected {
            candle_core::bail!("pointwise: input {:?} for {cin} channels and {pixels} pixels", xl.dims())
        }
        let (x, w, b) = (f32_data(xs, xl)?, Weights::of(ws, wl)?.to_f32(), f32_data(bs, bl)?);
        let mut y = Vec::<f32>::with_capacity(bsz * pixels * cout);
        // Per image: to tokens, y [HW, C_out] = xᵀ [HW, C_in] · Wᵀ, bias per column;
        // from tokens, y [C_out, HW] = W · tᵀ [C_in, HW], bias per row.
        let (m, n) = if self.to_tokens { (pixels, cout) } else { (cout, pixels) };
        let (rb, cb) = grid(m, n, threads().div_ceil(bsz).max(1));
        let chunk = n.div_ceil(cb).next_multiple_of(64).min(n);
        let (band, cb) = (m.div_ceil(rb), n.div_ceil(chunk));
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..bsz * rb * cb).into_par_iter().for_each(|task| {
            let (img, t) = (task / (rb * cb), task % (rb * cb));
            let (r0, c0) = ((t / cb) * band, (t % cb) * chunk);
            let (nr, nc) = (band.min(m.saturating_sub(r0)), chunk.min(n.saturating_sub(c0)));
            if nr == 0 || nc == 0 {
                return;
            }
            let xi = &x[img * pixels * cin..][..pixels * cin];
            // SAFETY: each task writes only rows r0.. and columns c0.. of its image's output.
            let dst = unsafe { y_ptr.get().add(img * m * n + r0 * n + c0) };
            for r in 0..nr {
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(r * n).cast::<MaybeUninit<f32>>(), nc) };
                if self.to_tokens {
                    for (d, &v) in row.iter_mut().zip(&b[c0..c0 + nc]) {
                        d.write(v);
                    }
                } else {
                    row.fill(MaybeUninit::new(b[r0 + r]));
                }
            }
            // SAFETY: the operands address this image's input and the weight.
            unsafe {
                if self.to_tokens {
                    let a = (xi[r0..].as_ptr(), 1, pixels);
                    sgemm((nr, nc, cin), dst, n, true, a, (w[c0 * cin..].as_ptr(), 1, cin), 1);
                } else {
                    let t = (xi[c0 * cin..].as_ptr(), 1, cin);
                    sgemm((nr, nc, cin), dst, n, true, (w[r0 * cin..].as_ptr(), cin, 1), t, 1);
                }
            }
        });
        // SAFETY: the tasks cover every row and column of every image's output, each writing the
        // bias before adding the product to it.
        unsafe { y.set_len(bsz * pixels * cout) };
        let shape = if self.to_tokens {
            Shape::from((bsz, pixels, cout))
        } else {
            Shape::from((bsz, cout, self.hw.0, self.hw.1))
        };
        Ok((CpuStorage::F32(y), shape))
    }
}
