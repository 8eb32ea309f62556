//! 3×3 stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3): each 2×2 output tile
//! comes from a 4×4 input tile with 16 multiplications per (input, output) channel pair instead
//! of 36, so the matrix products shrink 2.25× (plus cheap transforms).
//!
//! With `U = G g Gᵀ` (weights), `V = Bᵀ d B` (input tiles) and `Y = Aᵀ M A`, the 16 products
//! `M_ξ = U_ξ [C_out, C_in] · V_ξ [C_in, tiles]` are plain matrix products, done per block of
//! tiles in parallel. The transform coefficients are 0, ±1 and ±½, so rounding stays close to
//! the direct convolution's (checked in `tests/cpu_kernels.rs`).

use std::cell::RefCell;

use rayon::prelude::*;

use super::{SendPtr, gemm::sgemm, threads};

/// Convolution geometry: batch, channels in/out, input size, padding; the output is
/// `(h + 2p - 2) × (w + 2p - 2)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub b: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub p: usize,
}

thread_local! {
    static BUFS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Bytes of transformed input per block of tiles.
const BLOCK_BYTES: usize = 2 << 20;

/// `out` (`[B, C_out, H_o, W_o]`) = conv3×3(`x`, `wt`) + `bias`.
pub(super) fn conv3x3(x: &[f32], wt: &[f32], bias: &[f32], s: &Shape, out: &mut [f32]) {
    let (ho, wo) = (s.h + 2 * s.p - 2, s.w + 2 * s.p - 2);
    let (tyn, txn) = (ho.div_ceil(2), wo.div_ceil(2));
    let tiles_per_img = tyn * txn;
    let tiles = s.b * tiles_per_img;
    // Input padded by p on the top/left and enough zeros on the bottom/right for whole tiles.
    let (hp, wp) = (2 * tyn + 2, 2 * txn + 2);
    let mut xp = vec![0f32; s.b * s.cin * hp * wp];
    xp.par_chunks_mut(hp * wp).zip(x.par_chunks(s.h * s.w)).for_each(|(dst, src)| {
        for (y, row) in src.chunks(s.w).enumerate() {
            dst[(y + s.p) * wp + s.p..][..s.w].copy_from_slice(row);
        }
    });
    let u = transform_weights(wt, s.cout, s.cin);

    let tb = (BLOCK_BYTES / (64 * s.cin)).clamp(64, 512).min(tiles.next_multiple_of(16));
    let blocks = tiles.div_ceil(tb);
    // Split the output channels too when there are few blocks.
    let splits = (2 * threads()).div_ceil(blocks).clamp(1, s.cout.div_ceil(64));
    let cc = s.cout.div_ceil(splits).next_multiple_of(16).min(s.cout);
    let splits = s.cout.div_ceil(cc);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..blocks * splits).into_par_iter().for_each(|task| {
        let (blk, split) = (task / splits, task % splits);
        let (t0, t1) = (blk * tb, ((blk + 1) * tb).min(tiles));
        let (c0, c1) = (split * cc, ((split + 1) * cc).min(s.cout));
        let n = t1 - t0;
        let out_ptr = out_ptr;
        BUFS.with_borrow_mut(|(v, m)| {
            v.resize(16 * s.cin * n, 0.0);
            m.resize(16 * (c1 - c0) * n, 0.0);
            transform_input(&xp, s, (hp, wp), (txn, tiles_per_img), (t0, t1), v);
            for xi in 0..16 {
                let (a, b) = (u[(xi * s.cout + c0) * s.cin..].as_ptr(), v[xi * s.cin * n..].as_ptr());
                let dst = m[xi * (c1 - c0) * n..].as_mut_ptr();
                // SAFETY: the slices hold the addressed matrices; dst is this task's buffer.
                unsafe { sgemm((c1 - c0, n, s.cin), dst, n, false, (a, s.cin, 1), (b, n, 1), 1) };
            }
            // SAFETY: each task writes only its own tiles of output channels c0..c1.
            unsafe { transform_output(m, &bias[c0..c1], (c0, s.cout), (ho, wo, txn, tiles_per_img), (t0, t1), out_ptr.0) };
        });
    });
}

/// `U_ξ[co][ci] = (G g Gᵀ)_ξ`, laid out `[16][C_out][C_in]`.
fn transform_weights(wt: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cout * cin];
    let u_ptr = SendPtr(u.as_mut_ptr());
    (0..cout).into_par_iter().for_each(|co| {
        let u_ptr = u_ptr;
        for ci in 0..cin {
            let g = &wt[(co * cin + ci) * 9..][..9];
            // t = G g (4×3), then t Gᵀ (4×4).
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            for (i, r) in t.iter().enumerate() {
                let row = [r[0], 0.5 * (r[0] + r[1] + r[2]), 0.5 * (r[0] - r[1] + r[2]), r[2]];
                for (j, &val) in row.iter().enumerate() {
                    // SAFETY: distinct (co, ci) per write; co is this task's.
                    unsafe { *u_ptr.0.add(((i * 4 + j) * cout + co) * cin + ci) = val };
                }
            }
        }
    });
    u
}

/// `V_ξ[ci][t - t0] = (Bᵀ d B)_ξ` for the 4×4 input tile `d` of tiles `t0..t1`.
fn transform_input(
    xp: &[f32],
    s: &Shape,
    (hp, wp): (usize, usize),
    (txn, tiles_per_img): (usize, usize),
    (t0, t1): (usize, usize),
    v: &mut [f32],
) {
    let n = t1 - t0;
    let plane = s.cin * n;
    for ci in 0..s.cin {
        for t in t0..t1 {
            let (img, r) = (t / tiles_per_img, t % tiles_per_img);
            let (ty, tx) = (r / txn, r % txn);
            let base = ((img * s.cin + ci) * hp + 2 * ty) * wp + 2 * tx;
            let mut d = [[0f32; 4]; 4];
            for (i, row) in d.iter_mut().enumerate() {
                row.copy_from_slice(&xp[base + i * wp..][..4]);
            }
            // Bᵀ d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3.
            let mut bd = [[0f32; 4]; 4];
            for j in 0..4 {
                bd[0][j] = d[0][j] - d[2][j];
                bd[1][j] = d[1][j] + d[2][j];
                bd[2][j] = d[2][j] - d[1][j];
                bd[3][j] = d[1][j] - d[3][j];
            }
            let col = ci * n + (t - t0);
            for (i, r) in bd.iter().enumerate() {
                let row = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]];
                for (j, &val) in row.iter().enumerate() {
                    v[(i * 4 + j) * plane + col] = val;
                }
            }
        }
    }
}

/// `out[img, c0 + co, 2ty.., 2tx..] = (Aᵀ M A) + bias` for tiles `t0..t1` and the block's
/// output channels.
///
/// # Safety
/// `out` addresses the whole `[B, C_out, H_o, W_o]` output; no other thread writes these tiles
/// of these channels.
unsafe fn transform_output(
    m: &[f32],
    bias: &[f32],
    (c0, cout): (usize, usize),
    (ho, wo, txn, tiles_per_img): (usize, usize, usize, usize),
    (t0, t1): (usize, usize),
    out: *mut f32,
) {
    let n = t1 - t0;
    let cc = bias.len();
    let plane = cc * n;
    for (co, &bv) in bias.iter().enumerate() {
        for t in t0..t1 {
            let col = co * n + (t - t0);
            let mut mm = [[0f32; 4]; 4];
            for (xi, val) in mm.iter_mut().flatten().enumerate() {
                *val = m[xi * plane + col];
            }
            // Aᵀ M: rows m0 + m1 + m2, m1 - m2 - m3; then the same on columns.
            let mut am = [[0f32; 4]; 2];
            for j in 0..4 {
                am[0][j] = mm[0][j] + mm[1][j] + mm[2][j];
                am[1][j] = mm[1][j] - mm[2][j] - mm[3][j];
            }
            let (img, r) = (t / tiles_per_img, t % tiles_per_img);
            let (oy, ox) = (2 * (r / txn), 2 * (r % txn));
            let base = ((img * cout + c0 + co) * ho + oy) * wo + ox;
            for (i, a) in am.iter().enumerate() {
                if oy + i >= ho {
                    break;
                }
                let y0 = a[0] + a[1] + a[2] + bv;
                let y1 = a[1] - a[2] - a[3] + bv;
                unsafe {
                    *out.add(base + i * wo) = y0;
                    if ox + 1 < wo {
                        *out.add(base + i * wo + 1) = y1;
                    }
                }
            }
        }
    }
}
