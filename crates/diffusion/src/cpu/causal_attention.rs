//! Causal multi-head self-attention of short sequences (the text encoders' 77 tokens), on the
//! fused q/k/v projection's raw output, all heads in one parallel pass and without copies
//! between ops: each (sequence, head) task transposes its keys, gathers its values, scores blocks of queries against
//! the keys up to the block's last position (16-key register tiles), takes each query's softmax
//! over the keys up to its own position and the weighted sum of values, and writes its columns
//! of the merged `[tokens, C]` output.

use rayon::prelude::*;

use super::SendPtr;
use super::simd::{exp, has_avx512, multiversion};

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
    // Keys padded to whole lanes.
    let n16 = n.next_multiple_of(LANES);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let seq = &qkv[b * n * 3 * c..(b + 1) * n * 3 * c];
        let (mut kt, mut v) = (vec![0f32; d * n16], vec![0f32; n * d]);
        for j in 0..n {
            for (e, &k) in seq[j * 3 * c + c + h * d..][..d].iter().enumerate() {
                kt[e * n16 + j] = k;
            }
            v[j * d..(j + 1) * d].copy_from_slice(&seq[j * 3 * c + 2 * c + h * d..][..d]);
        }
        let mut qs = vec![0f32; QB * d];
        let mut scores = vec![0f32; QB * n16];
        for i0 in (0..n).step_by(QB) {
            let count = QB.min(n - i0);
            for (qi, q) in qs.chunks_exact_mut(d).enumerate().take(count) {
                for (q, &v) in q.iter_mut().zip(&seq[(i0 + qi) * 3 * c + h * d..][..d]) {
                    *q = v * scale;
                }
            }
            // The last query of the block sees keys 0..=i0 + count - 1.
            block_scores(&qs, &kt, (i0 + count).div_ceil(LANES), &mut scores);
            for (qi, scores) in scores.chunks_exact_mut(n16).enumerate().take(count) {
                let i = i0 + qi;
                // SAFETY: (b, h, i) addresses this task's own d columns of one output row.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add((b * n + i) * c + h * d), d) };
                softmax(&mut scores[..=i]);
                weighted_sum(&scores[..=i], &v, o);
            }
        }
    });
}

/// Lanes of a score block; keys are padded to a multiple of it.
const LANES: usize = 16;
/// Queries scored together (sharing each load of the keys).
const QB: usize = 4;

/// `scores[q · n16 + j] = qs[q] · kt[.., j]` for the [`QB`] queries of `qs` (`[QB, d]`) and
/// keys `j < blocks · LANES`; `kt` is `[d, n16]`.
fn block_scores(qs: &[f32], kt: &[f32], blocks: usize, scores: &mut [f32]) {
    let d = qs.len() / QB;
    let n16 = kt.len() / d.max(1);
    assert!(qs.len() == QB * d && kt.len() == d * n16 && scores.len() == QB * n16 && blocks * LANES <= n16);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512 is present; the sizes are checked above.
        unsafe { block_scores_avx512(qs.as_ptr(), d, kt.as_ptr(), n16, blocks, scores.as_mut_ptr()) };
        return;
    }
    for jb in 0..blocks {
        for (q, s) in qs.chunks_exact(d).zip(scores.chunks_exact_mut(n16)) {
            for (j, s) in s[jb * LANES..(jb + 1) * LANES].iter_mut().enumerate() {
                *s = q.iter().enumerate().map(|(e, &q)| q * kt[e * n16 + jb * LANES + j]).sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_scores_avx512(qs: *const f32, d: usize, kt: *const f32, n16: usize, blocks: usize, scores: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller's sizes bound every offset.
    for jb in 0..blocks {
        let mut acc = [_mm512_setzero_ps(); QB];
        for e in 0..d {
            let k = unsafe { _mm512_loadu_ps(kt.add(e * n16 + jb * LANES)) };
            for (q, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(unsafe { *qs.add(q * d + e) }), k, *acc);
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(scores.add(q * n16 + jb * LANES), *acc) };
        }
    }
}

multiversion! {
    /// `scores` (one query against keys `0..scores.len()`) to their softmax.
    fn softmax(scores: &mut [f32]) {
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let inv = 1.0 / scores.iter().sum::<f32>();
        scores.iter_mut().for_each(|s| *s *= inv);
    }
}

/// `out = Σ_j p[j] · v[j, ..]` for `v` `[p.len(), d]`, `d = out.len()`.
fn weighted_sum(p: &[f32], v: &[f32], out: &mut [f32]) {
    let d = out.len();
    assert!(v.len() >= p.len() * d);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512 is present; the sizes are checked above.
        unsafe { weighted_sum_avx512(p, v.as_ptr(), out) };
        return;
    }
    out.fill(0.0);
    for (&p, v) in p.iter().zip(v.chunks_exact(d)) {
        for (o, &v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}

/// [`weighted_sum`] with up to 64 output channels per pass held in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sum_avx512(p: &[f32], v: *const f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = out.len();
    // SAFETY (whole body): `v` holds p.len() rows of d floats; masks stop at d.
    for c0 in (0..d).step_by(64) {
        let masks: [__mmask16; 4] = std::array::from_fn(|r| {
            let left = d.saturating_sub(c0 + 16 * r).min(16);
            ((1u32 << left) - 1) as __mmask16
        });
        let mut acc = [_mm512_setzero_ps(); 4];
        for (j, &pj) in p.iter().enumerate() {
            let pj = _mm512_set1_ps(pj);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = unsafe { _mm512_maskz_loadu_ps(masks[r], v.add(j * d + c0 + 16 * r)) };
                *acc = _mm512_fmadd_ps(pj, x, *acc);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(c0 + 16 * r), masks[r], *acc) };
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
            let split =
                |i: usize| qkv.narrow(2, i * c, c)?.reshape((b, n, heads, c / heads))?.transpose(1, 2)?.contiguous();
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let mask: Vec<f32> =
                (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
            let mask = Tensor::from_vec(mask, (n, n), &dev)?;
            let scores = (q.matmul(&k.t()?)? * ((c / heads) as f64).powf(-0.5))?.broadcast_add(&mask)?;
            let expected =
                candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
            let expected = expected.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![f32::NAN; b * n * c];
            causal_attention(&qkv.flatten_all()?.to_vec1::<f32>()?, (b, n, c), heads, &mut out);
            let err = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "{b}x{n}x{c}/{heads}: max abs error {err}");
        }
        Ok(())
    }
}
