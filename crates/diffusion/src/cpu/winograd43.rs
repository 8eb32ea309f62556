//! 3×3 stride-1 convolution by Winograd's F(4×4, 3×3): each 4×4 output tile comes from a 6×6
//! input tile with 36 multiplications per (input, output) channel pair instead of 144, so the
//! matrix products shrink 4× (F(2×2, 3×3) of [`super::winograd`]: 2.25×), for larger
//! transforms with coefficients up to 8. Same structure as `winograd.rs`: per block of tiles,
//! the input transform, 36 products `U_ξ [C_out, C_in] · V_ξ [C_in, tiles]`, the output
//! transform. Matrices (Lavin & Gray, interpolation points 0, ±1, ±2, ∞):
//!
//! ```text
//! Bᵀ = [4  0 -5  0 1 0]    G = [ 1/4     0    0]    Aᵀ = [1 1  1 1  1 0]
//!      [0 -4 -4  1 1 0]        [-1/6 -1/6 -1/6]         [0 1 -1 2 -2 0]
//!      [0  4 -4 -1 1 0]        [-1/6  1/6 -1/6]         [0 1  1 4  4 0]
//!      [0 -2 -1  2 1 0]        [1/24 1/12  1/6]         [0 1 -1 8 -8 1]
//!      [0  2 -1 -2 1 0]        [1/24 -1/12 1/6]
//!      [0  4  0 -5 0 1]        [   0    0    1]
//! ```

use rayon::prelude::*;

use super::SendPtr;
use super::simd::multiversion;
use super::winograd::{Shape, Variant};

/// F(4×4, 3×3), run by [`super::winograd::conv3x3`].
pub(super) const F4: Variant =
    Variant { tile: 4, points: 36, weights: transform_weights, input: transform_input, output: transform_output };

/// `U_ξ[co][ci] = (G g Gᵀ)_ξ`, laid out `[36][C_out][C_in]`.
fn transform_weights(wt: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = super::winograd::take_weights_buffer(36 * cout * cin);
    let u_ptr = SendPtr(u.as_mut_ptr());
    wt.par_chunks(9 * cin).enumerate().for_each(|(co, g)| {
        // SAFETY: row co of every plane is written by this task only.
        let rows: [&mut [f32]; 36] = std::array::from_fn(|xi| unsafe {
            std::slice::from_raw_parts_mut(u_ptr.get().add((xi * cout + co) * cin), cin)
        });
        let mut scratch = vec![0f64; 27 * cin];
        transform_weight_row(g, rows, &mut scratch);
    });
    u
}

multiversion! {
    /// The 36 transformed values of each of the `C_in` 3×3 kernels of one output channel
    /// (`g` `[C_in, 9]`), into the 36 rows `u` (`C_in` each), computed in f64 and rounded once.
    fn transform_weight_row(g: &[f32], u: [&mut [f32]; 36], scratch: &mut [f64]) {
        let cin = g.len() / 9;
        let (taps, t) = scratch.split_at_mut(9 * cin);
        for (ci, k) in g.chunks_exact(9).enumerate() {
            for (e, &val) in k.iter().enumerate() {
                taps[e * cin + ci] = val as f64;
            }
        }
        // t = G g: 6×3 planes over input channels.
        for c in 0..3 {
            for ci in 0..cin {
                let r = g_col(taps[c * cin + ci], taps[(3 + c) * cin + ci], taps[(6 + c) * cin + ci]);
                for (i, &val) in r.iter().enumerate() {
                    t[(c * 6 + i) * cin + ci] = val;
                }
            }
        }
        // U[i][j] = G (t[i][0], t[i][1], t[i][2]).
        for (xi, row) in u.into_iter().enumerate() {
            let (i, j) = (xi / 6, xi % 6);
            for (ci, dst) in row.iter_mut().enumerate().take(cin) {
                *dst = g_col(t[i * cin + ci], t[(6 + i) * cin + ci], t[(12 + i) * cin + ci])[j] as f32;
            }
        }
    }
}

/// `G v` for one column `v` of 3 values (in f64: `G`'s sixths and 24ths are inexact in f32).
#[inline(always)]
fn g_col(v0: f64, v1: f64, v2: f64) -> [f64; 6] {
    let (s, d) = (v0 + v2, v1);
    [v0 / 4.0, -(s + d) / 6.0, -(s - d) / 6.0, v0 / 24.0 + v1 / 12.0 + v2 / 6.0, v0 / 24.0 - v1 / 12.0 + v2 / 6.0, v2]
}

/// The tiles `t0..t1` as runs along one tile row: `(image, tile row, first tile column,
/// run length, offset of the run in the block)`.
fn runs(
    (txn, tiles_per_img): (usize, usize),
    (t0, t1): (usize, usize),
) -> impl Iterator<Item = (usize, usize, usize, usize, usize)> {
    let mut t = t0;
    std::iter::from_fn(move || {
        if t >= t1 {
            return None;
        }
        let (img, r) = (t / tiles_per_img, t % tiles_per_img);
        let (ty, tx0) = (r / txn, r % txn);
        let len = (txn - tx0).min(t1 - t);
        let run = (img, ty, tx0, len, t - t0);
        t += len;
        Some(run)
    })
}

multiversion! {
    /// `V_ξ[ci][t - t0] = (Bᵀ d B)_ξ` for the 6×6 input tile `d` of tiles `t0..t1`, run by run.
    fn transform_input(
        x: &[f32],
        s: &Shape,
        tiling: (usize, usize),
        range: (usize, usize),
        v: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let n = range.1 - range.0;
        let plane = s.cin * n;
        // Row scratch: 6 input rows, 6 transformed rows (4·len + 4 wide), 4 phases (len + 1).
        let width = 4 * tiling.0 + 4;
        let phase = tiling.0 + 1;
        scratch.resize(12 * width + 4 * phase, 0.0);
        let (rows, rest) = scratch.split_at_mut(6 * width);
        let (trows, phases) = rest.split_at_mut(6 * width);
        for (img, ty, tx0, len, off) in runs(tiling, range) {
            let w2 = 4 * len + 4;
            let x0 = (4 * tx0) as isize - s.p as isize;
            let (c_lo, c_hi) = (x0.max(0) as usize, ((x0 + w2 as isize).min(s.w as isize)).max(0) as usize);
            let d_lo = (c_lo as isize - x0) as usize;
            for ci in 0..s.cin {
                let chan = &x[(img * s.cin + ci) * s.h * s.w..][..s.h * s.w];
                for i in 0..6 {
                    let row = &mut rows[i * width..][..w2];
                    let y = (4 * ty + i) as isize - s.p as isize;
                    if y < 0 || y >= s.h as isize || c_hi <= c_lo {
                        row.fill(0.0);
                        continue;
                    }
                    row[..d_lo].fill(0.0);
                    row[d_lo..d_lo + c_hi - c_lo].copy_from_slice(&chan[y as usize * s.w + c_lo..][..c_hi - c_lo]);
                    row[d_lo + c_hi - c_lo..].fill(0.0);
                }
                // Bᵀ d down the columns.
                {
                    let r: [&[f32]; 6] = std::array::from_fn(|i| &rows[i * width..][..w2]);
                    let (t0r, rest) = trows.split_at_mut(width);
                    let (t1r, rest) = rest.split_at_mut(width);
                    let (t2r, rest) = rest.split_at_mut(width);
                    let (t3r, rest) = rest.split_at_mut(width);
                    let (t4r, t5r) = rest.split_at_mut(width);
                    for c in 0..w2 {
                        let (d0, d1, d2, d3, d4, d5) = (r[0][c], r[1][c], r[2][c], r[3][c], r[4][c], r[5][c]);
                        t0r[c] = 4.0 * d0 - 5.0 * d2 + d4;
                        t1r[c] = -4.0 * (d1 + d2) + d3 + d4;
                        t2r[c] = 4.0 * (d1 - d2) - d3 + d4;
                        t3r[c] = 2.0 * (d3 - d1) - d2 + d4;
                        t4r[c] = 2.0 * (d1 - d3) - d2 + d4;
                        t5r[c] = 4.0 * d1 - 5.0 * d3 + d5;
                    }
                }
                // ... and across the rows: tile k has columns 4k .. 4k + 5.
                let col = ci * n + off;
                for i in 0..6 {
                    let t = &trows[i * width..][..w2];
                    let (q0, rest) = phases.split_at_mut(phase);
                    let (q1, rest) = rest.split_at_mut(phase);
                    let (q2, q3) = rest.split_at_mut(phase);
                    for (k, c) in t.chunks_exact(4).enumerate() {
                        q0[k] = c[0];
                        q1[k] = c[1];
                        q2[k] = c[2];
                        q3[k] = c[3];
                    }
                    let (q0, q1, q2, q3) = (&q0[..len + 1], &q1[..len + 1], &q2[..len], &q3[..len]);
                    let (q0n, q1n) = (&q0[1..], &q1[1..]);
                    let base = 6 * i * plane + col;
                    let (v0, rest) = v[base..].split_at_mut(plane);
                    let (v1, rest) = rest.split_at_mut(plane);
                    let (v2, rest) = rest.split_at_mut(plane);
                    let (v3, rest) = rest.split_at_mut(plane);
                    let (v4, v5) = rest.split_at_mut(plane);
                    let (v0, v1, v2, v3, v4, v5) =
                        (&mut v0[..len], &mut v1[..len], &mut v2[..len], &mut v3[..len], &mut v4[..len], &mut v5[..len]);
                    for k in 0..len {
                        let (c0, c1, c2, c3, c4, c5) = (q0[k], q1[k], q2[k], q3[k], q0n[k], q1n[k]);
                        v0[k] = 4.0 * c0 - 5.0 * c2 + c4;
                        v1[k] = -4.0 * (c1 + c2) + c3 + c4;
                        v2[k] = 4.0 * (c1 - c2) - c3 + c4;
                        v3[k] = 2.0 * (c3 - c1) - c2 + c4;
                        v4[k] = 2.0 * (c1 - c3) - c2 + c4;
                        v5[k] = 4.0 * c1 - 5.0 * c3 + c5;
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `out[img, c0 + co, 4ty.., 4tx..] = (Aᵀ M A) + bias` for tiles `t0..t1` and the block's
    /// output channels; `out` is the whole `[B, C_out, H_o, W_o]` output, of which no other
    /// thread writes these tiles of these channels.
    fn transform_output(
        m: &[f32],
        bias: &[f32],
        channels: (usize, usize),
        geometry: (usize, usize, usize, usize),
        range: (usize, usize),
        out: SendPtr,
        scratch: &mut Vec<f32>,
    ) {
        let (c0, cout) = channels;
        let (ho, wo, txn, tiles_per_img) = geometry;
        let n = range.1 - range.0;
        let plane = bias.len() * n;
        let _ = scratch;
        for (img, ty, tx0, len, off) in runs((txn, tiles_per_img), range) {
            let oy = 4 * ty;
            // Tiles whose 4 columns are all inside the output.
            let full = len.min((wo - 4 * tx0) / 4);
            let rows = (ho - oy).min(4);
            for (co, &bv) in bias.iter().enumerate() {
                let col = co * n + off;
                let mm: [&[f32]; 36] = std::array::from_fn(|xi| &m[xi * plane + col..][..len]);
                let base = ((img * cout + c0 + co) * ho + oy) * wo + 4 * tx0;
                // SAFETY: rows oy.. of this channel, columns 4tx0 .. 4(tx0 + len) (clipped to
                // W_o), belong to these tiles.
                let row = |r: usize| unsafe { std::slice::from_raw_parts_mut(out.0.add(base + r * wo), (wo - 4 * tx0).min(4 * len)) };
                let mut y4: [&mut [f32]; 4] = std::array::from_fn(|r| if r < rows { row(r) } else { &mut [] });
                for k in 0..len {
                    // Aᵀ M A for tile k: columns first (a[r][j]), then rows.
                    let mut a = [[0f32; 6]; 4];
                    for j in 0..6 {
                        let (p0, p1, p2, p3, p4, p5) =
                            (mm[j][k], mm[6 + j][k], mm[12 + j][k], mm[18 + j][k], mm[24 + j][k], mm[30 + j][k]);
                        let (s12, d12, s34, d34) = (p1 + p2, p1 - p2, p3 + p4, p3 - p4);
                        a[0][j] = p0 + s12 + s34;
                        a[1][j] = d12 + 2.0 * d34;
                        a[2][j] = s12 + 4.0 * s34;
                        a[3][j] = d12 + 8.0 * d34 + p5;
                    }
                    for (r, y) in y4.iter_mut().enumerate().take(rows) {
                        let a = &a[r];
                        let (s12, d12, s34, d34) = (a[1] + a[2], a[1] - a[2], a[3] + a[4], a[3] - a[4]);
                        let vals = [a[0] + s12 + s34 + bv, d12 + 2.0 * d34 + bv, s12 + 4.0 * s34 + bv, d12 + 8.0 * d34 + a[5] + bv];
                        if k < full {
                            y[4 * k..4 * k + 4].copy_from_slice(&vals);
                        } else {
                            let tail = &mut y[4 * k..];
                            let m = tail.len();
                            tail.copy_from_slice(&vals[..m]);
                        }
                    }
                }
            }
        }
    }
}
