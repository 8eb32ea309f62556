//! `y = act(x Wᵀ + b) (+ r)` for few rows (the text encoders' 77-token chunks), on raw f32
//! buffers, with AVX-512.
//!
//! The product is computed transposed, `yᵀ = W xᵀ`: a register tile is `MR` output features
//! (scalars of `W`'s rows, read in place, broadcast) × `NR` rows of `x` (two vectors of the
//! packed `xᵀ`), so the weights need no packing and no copy: each is read once per call, and
//! only the small `xᵀ` is repacked. The bias starts the accumulators; activation and residual
//! are applied to the tile as it is written back, transposed. Work is split across threads by
//! output features; several weight matrices sharing the input (q/k/v) run as one pass
//! ([`Segment`]).

use rayon::prelude::*;

use super::simd::{exp, gelu_erf, has_avx512, multiversion};
use super::{SendPtr, threads};

/// Output features per register tile.
const MR: usize = 12;
/// Rows of `x` per register tile.
const NR: usize = 32;

/// The activation applied after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// `x · Φ(x)`, exact (erf) form.
    Gelu,
}

/// One weight `[n, k]` (row-major) with its bias `[n]`, written to output columns
/// `column..column + n`.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub column: usize,
}

/// Whether [`linear_rows`] can run on this CPU.
pub fn available() -> bool {
    has_avx512()
}

/// `out[i, s.column + j] = act(Σ_k x[i, k] · s.weight[j, k] + s.bias[j]) + residual[i, …]` for
/// every segment `s`; `x` is `[rows, k]`, `out` and `residual` are `[rows, out_cols]`.
///
/// # Panics
/// If the sizes disagree or the CPU lacks AVX-512 ([`available`]).
pub fn linear_rows(
    x: &[f32],
    k: usize,
    segments: &[Segment<'_>],
    act: Act,
    residual: Option<&[f32]>,
    out: &mut [f32],
    out_cols: usize,
) {
    assert!(available(), "linear_rows needs AVX-512");
    let rows = x.len() / k.max(1);
    assert_eq!(x.len(), rows * k);
    assert_eq!(out.len(), rows * out_cols);
    assert!(residual.is_none_or(|r| r.len() == out.len()));
    for s in segments {
        let n = s.bias.len();
        assert!(s.weight.len() == n * k && s.column + n <= out_cols);
    }
    if rows == 0 || k == 0 {
        return;
    }
    let xt = pack_transposed(x, rows, k);
    // Units of up to MR output features; tasks of whole units, a few per thread.
    let units: Vec<(usize, usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(s, seg)| {
            let n = seg.bias.len();
            (0..n.div_ceil(MR)).map(move |u| (s, u * MR, MR.min(n - u * MR)))
        })
        .collect();
    let per_task = units.len().div_ceil(4 * threads()).max(1);
    let out_ptr = SendPtr(out.as_mut_ptr());
    units.par_chunks(per_task).for_each(|task| {
        let mut tile = [0f32; MR * NR];
        for &(s, n0, nr) in task {
            let seg = &segments[s];
            let w = &seg.weight[n0 * k..(n0 + nr) * k];
            for t in 0..rows.div_ceil(NR) {
                let bias = &seg.bias[n0..n0 + nr];
                // SAFETY: AVX-512 checked above; `w` holds nr rows of k, the panel NR·k floats.
                unsafe { tile_product(w, bias, k, &xt[t * NR * k..(t + 1) * NR * k], &mut tile) };
                let (r0, nrows) = (t * NR, NR.min(rows - t * NR));
                if act != Act::None {
                    activate(&mut tile[..nr * NR], act);
                }
                for i in 0..nrows {
                    let at = (r0 + i) * out_cols + seg.column + n0;
                    // SAFETY: units are disjoint column ranges of `out`, which holds
                    // rows · out_cols floats; only this task writes these.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(at), nr) };
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = tile[j * NR + i];
                    }
                    if let Some(r) = residual {
                        for (d, r) in dst.iter_mut().zip(&r[at..at + nr]) {
                            *d += r;
                        }
                    }
                }
            }
        }
    });
}

/// `x` `[rows, k]` as panels of [`NR`] rows, each `[k, NR]` (zero-padded past the last row).
fn pack_transposed(x: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let panels = rows.div_ceil(NR);
    let mut xt = vec![0f32; panels * NR * k];
    xt.par_chunks_mut(NR * k).enumerate().for_each(|(t, panel)| {
        for i in 0..NR.min(rows - t * NR) {
            let row = &x[(t * NR + i) * k..(t * NR + i + 1) * k];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * NR + i] = v;
            }
        }
    });
    xt
}

multiversion! {
    /// Applies the activation to a tile.
    fn activate(tile: &mut [f32], act: Act) {
        match act {
            Act::None => {}
            Act::QuickGelu => tile.iter_mut().for_each(|v| *v /= 1.0 + exp(-1.702 * *v)),
            Act::Gelu => tile.iter_mut().for_each(|v| *v = gelu_erf(*v)),
        }
    }
}

/// `tile[j·NR + i] = bias[j] + Σ_k w[j, k] · panel[k, i]` for `j < nr = bias.len()` (≤ [`MR`]).
///
/// # Safety
/// The CPU must have AVX-512F; `w` holds `nr · k` floats, `panel` `k · NR`.
unsafe fn tile_product(w: &[f32], bias: &[f32], k: usize, panel: &[f32], tile: &mut [f32; MR * NR]) {
    let nr = bias.len();
    debug_assert!(w.len() == nr * k && panel.len() == k * NR);
    macro_rules! dispatch {
        ($($n:literal)*) => {
            match nr {
                $($n => unsafe { tile_avx512::<$n>(w.as_ptr(), bias.as_ptr(), k, panel.as_ptr(), tile.as_mut_ptr()) },)*
                _ => unreachable!("tile of {nr} features"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(w: *const f32, bias: *const f32, k: usize, panel: *const f32, tile: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller's sizes bound every offset.
    let mut acc: [[__m512; 2]; R] = std::array::from_fn(|r| [_mm512_set1_ps(unsafe { *bias.add(r) }); 2]);
    for kk in 0..k {
        let (b0, b1) = unsafe { (_mm512_loadu_ps(panel.add(kk * NR)), _mm512_loadu_ps(panel.add(kk * NR + 16))) };
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(unsafe { *w.add(r * k + kk) });
            acc[0] = _mm512_fmadd_ps(a, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(a, b1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        unsafe {
            _mm512_storeu_ps(tile.add(r * NR), acc[0]);
            _mm512_storeu_ps(tile.add(r * NR + 16), acc[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_avx512<const R: usize>(_: *const f32, _: *const f32, _: usize, _: *const f32, _: *mut f32) {
    unreachable!("linear_rows needs AVX-512")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn max_abs(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
    }

    /// Against candle's `x Wᵀ + b`, activation and residual, for sizes with partial tiles.
    #[test]
    fn matches_candle() -> candle_core::Result<()> {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return Ok(());
        }
        let d = Device::Cpu;
        for (rows, k, n, act) in [(154, 96, 40, Act::QuickGelu), (33, 70, 25, Act::Gelu), (5, 16, 12, Act::None)] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &d)?;
            let (w1, b1) = (Tensor::randn(0f32, 0.3, (n, k), &d)?, Tensor::randn(0f32, 1.0, n, &d)?);
            let (w2, b2) = (Tensor::randn(0f32, 0.3, (7, k), &d)?, Tensor::randn(0f32, 1.0, 7, &d)?);
            let residual = Tensor::randn(0f32, 1.0, (rows, n + 7), &d)?;
            let act_ref = |t: Tensor| match act {
                Act::None => Ok(t),
                Act::QuickGelu => &t * candle_nn::ops::sigmoid(&(&t * 1.702)?)?,
                Act::Gelu => t.gelu_erf(),
            };
            let y1 = act_ref(x.matmul(&w1.t()?)?.broadcast_add(&b1)?)?;
            let y2 = act_ref(x.matmul(&w2.t()?)?.broadcast_add(&b2)?)?;
            let expected = (Tensor::cat(&[y1, y2], 1)? + &residual)?.flatten_all()?.to_vec1::<f32>()?;
            let vec = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            let (xv, w1v, b1v, w2v, b2v) = (vec(&x)?, vec(&w1)?, vec(&b1)?, vec(&w2)?, vec(&b2)?);
            let segments =
                [Segment { weight: &w1v, bias: &b1v, column: 0 }, Segment { weight: &w2v, bias: &b2v, column: n }];
            let mut out = vec![f32::NAN; rows * (n + 7)];
            linear_rows(&xv, k, &segments, act, Some(&vec(&residual)?), &mut out, n + 7);
            let err = max_abs(&out, &expected);
            assert!(err < 1e-4, "{rows}x{k}->{n} {act:?}: max abs error {err}");
        }
        Ok(())
    }
}
