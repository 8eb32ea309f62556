//! Causal multi-head self-attention of short sequences (the text encoders' 77 tokens), on the
//! fused q/k/v projection's raw output, all heads in one parallel pass and without copies
//! between ops: each (sequence, head) task transposes its keys, computes the scores of each
//! query against the keys up to its own position, the softmax, and the weighted sum of values,
//! and writes its columns of the merged `[tokens, C]` output.

use rayon::prelude::*;

use super::SendPtr;
use super::simd::{exp, multiversion};

/// `qkv` is `[batch · n, 3C]` (queries, keys and values side by side, `heads` heads of
/// `C / heads` channels each); writes `softmax(q kᵀ / sqrt(C / heads) + causal mask) v` to
/// `out` `[batch · n, C]`, heads merged.
///
/// # Panics
/// If the sizes disagree or `heads` does not divide `C`.
pub fn causal_attention(qkv: &[f32], (batch, n, c): (usize, usize, usize), heads: usize, out: &mut [f32]) {
    assert!(heads > 0 && c.is_multiple_of(heads));
    assert!(qkv.len() == batch * n * 3 * c && out.len() == batch * n * c);
    let d = c / heads;
    let scale = (d as f32).powf(-0.5);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let seq = &qkv[b * n * 3 * c..(b + 1) * n * 3 * c];
        let mut kt = vec![0f32; d * n];
        for j in 0..n {
            for (e, &v) in seq[j * 3 * c + c + h * d..][..d].iter().enumerate() {
                kt[e * n + j] = v;
            }
        }
        let mut scores = vec![0f32; n];
        for i in 0..n {
            let q = &seq[i * 3 * c + h * d..][..d];
            // SAFETY: (b, h, i) addresses this task's own d columns of one output row.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add((b * n + i) * c + h * d), d) };
            query(q, &kt, (n, 3 * c), &seq[2 * c + h * d..], scale, &mut scores[..=i], o);
        }
    });
}

multiversion! {
    /// One query against keys `0..scores.len()`: `kt` is `[d, n]`, value `j` starts at
    /// `values[j · stride]`.
    fn query(q: &[f32], kt: &[f32], dims: (usize, usize), values: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
        let (n, stride) = dims;
        scores.fill(0.0);
        let len = scores.len();
        for (e, &qe) in q.iter().enumerate() {
            let qe = qe * scale;
            for (s, &k) in scores.iter_mut().zip(&kt[e * n..e * n + len]) {
                *s += qe * k;
            }
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let inv = 1.0 / scores.iter().sum::<f32>();
        out.fill(0.0);
        let d = out.len();
        for (j, &p) in scores.iter().enumerate() {
            let p = p * inv;
            for (o, &v) in out.iter_mut().zip(&values[j * stride..j * stride + d]) {
                *o += p * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Tensor};

    /// Against candle's composition (split heads, masked scores, softmax, merge).
    #[test]
    fn matches_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (b, n, c, heads) in [(2, 77, 96, 4), (1, 5, 24, 3)] {
            let qkv = Tensor::randn(0f32, 1.0, (b, n, 3 * c), &dev)?;
            let split = |i: usize| qkv.narrow(2, i * c, c)?.reshape((b, n, heads, c / heads))?.transpose(1, 2)?.contiguous();
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let mask: Vec<f32> =
                (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
            let mask = Tensor::from_vec(mask, (n, n), &dev)?;
            let scores = (q.matmul(&k.t()?)? * ((c / heads) as f64).powf(-0.5))?.broadcast_add(&mask)?;
            let expected = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
            let expected = expected.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![f32::NAN; b * n * c];
            causal_attention(&qkv.flatten_all()?.to_vec1::<f32>()?, (b, n, c), heads, &mut out);
            let err = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "{b}x{n}x{c}/{heads}: max abs error {err}");
        }
        Ok(())
    }
}
