//! Layer norm over the last dimension of row-major f32 rows, on raw buffers (the text
//! encoders' fused layer path): one pass for the mean, one for the variance, one to normalise.

use rayon::prelude::*;

use super::simd::multiversion;

/// `out[i] = (x[i] - mean) / sqrt(var + eps) · weight + bias` for each row of `x`
/// (`weight.len()` wide); rows are split across threads.
///
/// # Panics
/// If the sizes disagree.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let c = weight.len();
    assert!(c > 0 && bias.len() == c && x.len() == out.len() && x.len().is_multiple_of(c));
    let rows_per_task = (16384 / c).max(1);
    out.par_chunks_mut(rows_per_task * c).zip(x.par_chunks(rows_per_task * c)).for_each(|(out, x)| {
        for (o, x) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            row(x, weight, bias, eps, o);
        }
    });
}

/// Lanes of the partial sums (so that the sums vectorise).
const LANES: usize = 16;

/// The sum of `v`, in [`LANES`] interleaved partial sums.
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail
}

multiversion! {
    fn row(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
        let n = x.len() as f32;
        let mean = lane_sum(x, |v| v) / n;
        let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, &x), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
            *o = (x - mean) * inv * w + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Against candle's layer norm, with a row width that is not a multiple of the lanes (on
    /// rows with a mean far from zero, where the two single-precision sums round differently).
    #[test]
    fn matches_candle() -> candle_core::Result<()> {
        let d = Device::Cpu;
        for (rows, c) in [(154, 768), (7, 37)] {
            let x = (Tensor::randn(0f32, 2.0, (rows, c), &d)? + 3.0)?;
            let (w, b) = (Tensor::randn(0f32, 1.0, c, &d)?, Tensor::randn(0f32, 1.0, c, &d)?);
            let expected = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5)?.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![f32::NAN; rows * c];
            let vec = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            layer_norm(&vec(&x)?, &vec(&w)?, &vec(&b)?, 1e-5, &mut out);
            let err = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-4, "{rows}x{c}: max abs error {err}");
        }
        Ok(())
    }
}
