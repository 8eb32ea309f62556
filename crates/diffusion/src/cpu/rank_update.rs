//! `W + U·D` for a weight `W` `[out, n]` and a product of small inner dimension (a LoRA merged
//! into its layer: `U` `[out, r]` already scaled, `D` `[r, n]`), written to a new buffer so
//! that the original stays intact for an exact un-merge.
//!
//! With `r` around 128 a general matrix product spends much of its time packing; here each
//! 12-row × 32-column tile of the result is read from `W` into 24 AVX-512 accumulators, gets its
//! `r` rank-one updates (the 32 columns of `D` for one `k` are two vectors, shared by the 12
//! rows; `U` is broadcast from memory) and is stored once. `D` is first packed into contiguous
//! 32-column panels (16 KiB each at rank 128; read in place, rows a weight's width apart would
//! fall into a few L1 sets), and the tiles go along each band of 12 rows, so that `W` is read
//! and the result written as sequential streams. Elsewhere (no AVX-512) the `gemm` crate runs.

use rayon::prelude::*;

use super::gemm::sgemm;
use super::simd::has_avx512;

/// Rows per register tile.
const MR: usize = 12;
/// Columns per register tile (two vectors).
const NR: usize = 32;

/// `src + u·d` as a new buffer, for `src` `[out, n]`, `u` `[out, r]` and `d` `[r, n]`, all
/// row-major f32; rows in parallel bands on rayon's pool when `parallel`.
///
/// # Panics
/// If the lengths disagree with the sizes.
pub fn add_product(src: &[f32], u: &[f32], d: &[f32], sizes: (usize, usize, usize), parallel: bool) -> Vec<f32> {
    let mut dst = Vec::new();
    add_product_into(&mut dst, src, u, d, sizes, parallel);
    dst
}

/// [`add_product`] into `dst`'s allocation (grown when too small; its contents are replaced):
/// a caller can allocate on its own thread, for example so that buffers freed later return to
/// the heap it allocates from next time.
pub fn add_product_into(
    dst: &mut Vec<f32>,
    src: &[f32],
    u: &[f32],
    d: &[f32],
    (out, n, r): (usize, usize, usize),
    parallel: bool,
) {
    assert!(src.len() == out * n, "rank update: sizes disagree");
    dst.clear();
    dst.reserve(out * n);
    // SAFETY: `src` holds `out × n` values and `dst` has room for as many; they do not overlap.
    unsafe {
        update(src.as_ptr(), dst.as_mut_ptr(), u, d, (out, n, r), parallel);
        // Every value was written.
        dst.set_len(out * n);
    }
}

/// [`add_product`] in place: `w += u·d`.
pub fn add_product_in_place(w: &mut [f32], u: &[f32], d: &[f32], (out, n, r): (usize, usize, usize), parallel: bool) {
    assert!(w.len() == out * n, "rank update: sizes disagree");
    let w = w.as_mut_ptr();
    // SAFETY: `w` holds `out × n` values; the kernel reads each tile before it writes it.
    unsafe { update(w, w, u, d, (out, n, r), parallel) };
}

/// `dst = src + u·d`, in bands of rows on rayon's pool when `parallel`, writing every value.
///
/// # Safety
/// `src` and `dst` must be valid for `out × n` values; they may be the same buffer.
unsafe fn update(
    src: *const f32,
    dst: *mut f32,
    u: &[f32],
    d: &[f32],
    (out, n, r): (usize, usize, usize),
    parallel: bool,
) {
    assert!(u.len() == out * r && d.len() == r * n, "rank update: sizes disagree");
    let band = if parallel { out.div_ceil(4 * super::threads()).next_multiple_of(MR) } else { out }.max(1);
    let (src, dst) = (src as usize, dst as usize);
    (0..out.div_ceil(band)).into_par_iter().for_each(|i| {
        let (r0, rows) = (i * band, band.min(out - i * band));
        let (src, dst) = (src as *const f32, dst as *mut f32);
        // SAFETY: band `i` is rows `r0..r0 + rows` of both buffers, disjoint from the other bands.
        unsafe { band_update(src.add(r0 * n), dst.add(r0 * n), &u[r0 * r..][..rows * r], d, (rows, n, r)) };
    });
}

/// `dst = src + u·d` for one band of `rows` rows.
///
/// # Safety
/// `src` and `dst` must be valid for `rows × n` values; they may be the same buffer.
unsafe fn band_update(src: *const f32, dst: *mut f32, u: &[f32], d: &[f32], (rows, n, r): (usize, usize, usize)) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512 is present; the caller guarantees the buffers.
        return unsafe { x86::band(src, dst, u, d, (rows, n, r)) };
    }
    if src != dst.cast_const() {
        // SAFETY: both hold rows × n values and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, rows * n) };
    }
    // SAFETY: `dst` is rows × n, `u` rows × r, `d` r × n; the inputs do not alias `dst`.
    unsafe { sgemm((rows, n, r), dst, n, true, (u.as_ptr(), r, 1), (d.as_ptr(), n, 1), 1) };
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles index accumulators by row and vector
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// # Safety
    /// AVX-512F; as [`super::band_update`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn band(
        src: *const f32,
        dst: *mut f32,
        u: &[f32],
        d: &[f32],
        (rows, n, r): (usize, usize, usize),
    ) {
        // D packed into 32-column panels (`[n / 32][r][32]`, zero-padded): one panel is read per
        // tile, from L1 / L2, while W streams through row by row.
        let blocks = n.div_ceil(NR);
        let mut packed = vec![0f32; blocks * r * NR];
        for (b, panel) in packed.chunks_exact_mut(r * NR).enumerate() {
            let (j0, w) = (b * NR, NR.min(n - b * NR));
            for (k, row) in panel.chunks_exact_mut(NR).enumerate() {
                row[..w].copy_from_slice(&d[k * n + j0..][..w]);
            }
        }
        // Lanes of a block's two column vectors.
        let masks = |j0: usize| {
            let w = NR.min(n - j0);
            let lanes = |v: usize| (!0u16).checked_shr((v * 16 + 16).saturating_sub(w) as u32).unwrap_or(0);
            [lanes(0), lanes(1)]
        };
        // Each band's rows of U transposed (`[r][12]`), so that a step's 12 values are adjacent.
        let mut ut = vec![0f32; r * MR];
        let mut i0 = 0;
        while i0 + MR <= rows {
            for i in 0..MR {
                for k in 0..r {
                    ut[k * MR + i] = u[(i0 + i) * r + k];
                }
            }
            for (b, panel) in packed.chunks_exact(r * NR).enumerate() {
                unsafe { tile::<MR>(src, dst, &ut, panel, (i0, b * NR, n, r), masks(b * NR)) };
            }
            i0 += MR;
        }
        for i in i0..rows {
            for (b, panel) in packed.chunks_exact(r * NR).enumerate() {
                unsafe { tile::<1>(src, dst, &u[i * r..][..r], panel, (i, b * NR, n, r), masks(b * NR)) };
            }
        }
    }

    /// Rows `i0..i0 + M`, columns `j0..` (two vectors, masked) of `dst = src + u·d`, with those
    /// rows of `u` in `ut` (`[r][M]`) and `d`'s columns `j0..j0 + 32` in `panel` (`[r][32]`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const M: usize>(
        src: *const f32,
        dst: *mut f32,
        ut: &[f32],
        panel: &[f32],
        (i0, j0, n, r): (usize, usize, usize, usize),
        masks: [__mmask16; 2],
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            for i in 0..M {
                for v in 0..2 {
                    acc[i][v] = _mm512_maskz_loadu_ps(masks[v], src.add((i0 + i) * n + j0 + v * 16));
                }
            }
            debug_assert!(ut.len() >= r * M && panel.len() >= r * NR);
            let (mut dp, mut up) = (panel.as_ptr(), ut.as_ptr());
            for _ in 0..r {
                let b0 = _mm512_loadu_ps(dp);
                let b1 = _mm512_loadu_ps(dp.add(16));
                for i in 0..M {
                    let a = _mm512_set1_ps(*up.add(i));
                    acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
                }
                (dp, up) = (dp.add(NR), up.add(M));
            }
            for i in 0..M {
                for v in 0..2 {
                    _mm512_mask_storeu_ps(dst.add((i0 + i) * n + j0 + v * 16), masks[v], acc[i][v]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Against a plain triple loop in f64, on sizes off the 12 × 32 tile grid, out of place and
    /// in place, serial and in bands.
    #[test]
    fn matches_a_plain_product() {
        let mut seed = 7u32;
        let mut rand = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (out, n, r, parallel) in [(37, 45, 5, false), (320, 320, 128, true), (13, 7, 3, true), (24, 64, 16, false)]
        {
            let w: Vec<f32> = (0..out * n).map(|_| rand()).collect();
            let u: Vec<f32> = (0..out * r).map(|_| rand()).collect();
            let d: Vec<f32> = (0..r * n).map(|_| rand()).collect();
            let want: Vec<f64> = (0..out * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    f64::from(w[e]) + (0..r).map(|k| f64::from(u[i * r + k]) * f64::from(d[k * n + j])).sum::<f64>()
                })
                .collect();
            let got = super::add_product(&w, &u, &d, (out, n, r), parallel);
            let mut in_place = w.clone();
            super::add_product_in_place(&mut in_place, &u, &d, (out, n, r), parallel);
            for (a, b) in [(&got, &want), (&in_place, &want)] {
                let err = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max);
                assert!(err < 1e-4, "{out}x{n} r{r}: {err}");
            }
        }
    }
}
