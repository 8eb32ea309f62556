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

use super::simd::multiversion;
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
    static BUFS: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Bytes of transformed input per block of tiles.
const BLOCK_BYTES: usize = 2 << 20;

/// The transformed-weights buffer of the last call, kept (up to [`KEEP_BYTES`]) so that the next
/// call does not pay the page faults of a fresh allocation again.
static WEIGHTS: std::sync::Mutex<Vec<f32>> = std::sync::Mutex::new(Vec::new());
const KEEP_BYTES: usize = 64 << 20;

/// A buffer of `len` floats for transformed weights (contents unspecified; every element is
/// written by the caller).
pub(super) fn take_weights_buffer(len: usize) -> Vec<f32> {
    let mut v = std::mem::take(&mut *WEIGHTS.lock().unwrap_or_else(|e| e.into_inner()));
    v.resize(len, 0.0);
    v
}

/// Returns a buffer from [`take_weights_buffer`] for reuse (dropped if large).
pub(super) fn give_weights_buffer(v: Vec<f32>) {
    if v.capacity() * 4 <= KEEP_BYTES {
        *WEIGHTS.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }
}

/// An input transform: `(x, shape, (tiles across, tiles per image), tile range, v, scratch)`.
type InputTransform = fn(&[f32], &Shape, (usize, usize), (usize, usize), &mut [f32], &mut Vec<f32>);
/// An output transform: `(m, bias, (c0, C_out), (H_o, W_o, tiles across, tiles per image),
/// tile range, out, scratch)`.
type OutputTransform =
    fn(&[f32], &[f32], (usize, usize), (usize, usize, usize, usize), (usize, usize), SendPtr, &mut Vec<f32>);

/// One Winograd algorithm F(m×m, 3×3): its output tile side `m`, its `(m + 2)²` transformed
/// points, and its three transforms.
pub(super) struct Variant {
    pub tile: usize,
    pub points: usize,
    pub weights: fn(&[f32], usize, usize) -> Vec<f32>,
    pub input: InputTransform,
    pub output: OutputTransform,
}

/// F(2×2, 3×3).
pub(super) const F2: Variant =
    Variant { tile: 2, points: 16, weights: transform_weights, input: transform_input, output: transform_output };

/// `out` (`[B, C_out, H_o, W_o]`) = conv3×3(`x`, `wt`) + `bias`, by `variant`.
pub(super) fn conv3x3(variant: &Variant, x: &[f32], wt: &[f32], bias: &[f32], s: &Shape, out: &mut [f32]) {
    let (ho, wo) = (s.h + 2 * s.p - 2, s.w + 2 * s.p - 2);
    let (tyn, txn) = (ho.div_ceil(variant.tile), wo.div_ceil(variant.tile));
    let tiles_per_img = tyn * txn;
    let tiles = s.b * tiles_per_img;
    let points = variant.points;
    let u = (variant.weights)(wt, s.cout, s.cin);

    // A multiple of 64 tiles: gemm's AVX-512 micro-kernel is 64 wide along them.
    let tb = ((BLOCK_BYTES / (4 * points * s.cin)).clamp(64, 512) / 64 * 64).min(tiles.next_multiple_of(16));
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
        BUFS.with_borrow_mut(|(v, m, scratch)| {
            v.resize(points * s.cin * n, 0.0);
            m.resize(points * (c1 - c0) * n, 0.0);
            (variant.input)(x, s, (txn, tiles_per_img), (t0, t1), v, scratch);
            for xi in 0..points {
                let (a, b) = (u[(xi * s.cout + c0) * s.cin..].as_ptr(), v[xi * s.cin * n..].as_ptr());
                let dst = m[xi * (c1 - c0) * n..].as_mut_ptr();
                // SAFETY: the slices hold the addressed matrices; dst is this task's buffer.
                unsafe { sgemm((c1 - c0, n, s.cin), dst, n, false, (a, s.cin, 1), (b, n, 1), 1) };
            }
            // Each task writes only its own tiles of output channels c0..c1.
            let geometry = (ho, wo, txn, tiles_per_img);
            (variant.output)(m, &bias[c0..c1], (c0, s.cout), geometry, (t0, t1), out_ptr, scratch);
        });
    });
    give_weights_buffer(u);
}

/// `U_ξ[co][ci] = (G g Gᵀ)_ξ`, laid out `[16][C_out][C_in]`.
fn transform_weights(wt: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = take_weights_buffer(16 * cout * cin);
    let u_ptr = SendPtr(u.as_mut_ptr());
    wt.par_chunks(9 * cin).enumerate().for_each(|(co, g)| {
        let mut local = vec![0f32; 16 * cin];
        transform_weight_row(g, &mut local);
        for (xi, row) in local.chunks_exact(cin).enumerate() {
            // SAFETY: row co of plane xi is written by this task only.
            unsafe {
                std::slice::from_raw_parts_mut(u_ptr.get().add((xi * cout + co) * cin), cin).copy_from_slice(row)
            };
        }
    });
    u
}

multiversion! {
    /// The 16 transformed values of each of the `C_in` 3×3 kernels of one output channel
    /// (`g` `[C_in, 9]`), into `u` `[16, C_in]`.
    fn transform_weight_row(g: &[f32], u: &mut [f32]) {
        let cin = g.len() / 9;
        for (ci, k) in g.chunks_exact(9).enumerate() {
            // t = G g (4×3), then t Gᵀ (4×4).
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (k[j], k[3 + j], k[6 + j]);
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            for (i, r) in t.iter().enumerate() {
                u[(4 * i) * cin + ci] = r[0];
                u[(4 * i + 1) * cin + ci] = 0.5 * (r[0] + r[1] + r[2]);
                u[(4 * i + 2) * cin + ci] = 0.5 * (r[0] - r[1] + r[2]);
                u[(4 * i + 3) * cin + ci] = r[2];
            }
        }
    }
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
    /// `V_ξ[ci][t - t0] = (Bᵀ d B)_ξ` for the 4×4 input tile `d` of tiles `t0..t1`, run by run
    /// so that the arithmetic vectorises across tiles.
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
        let width = tiling.0 + 1;
        scratch.resize(8 * width + 8 * width, 0.0);
        let (eo, rows) = scratch.split_at_mut(8 * width);
        let (e, o) = eo.split_at_mut(4 * width);
        for (img, ty, tx0, len, off) in runs(tiling, range) {
            let w2 = 2 * len + 2;
            // Input columns 2tx0 - p .. 2tx0 - p + w2, clipped to the image.
            let x0 = (2 * tx0) as isize - s.p as isize;
            let (c_lo, c_hi) = (x0.max(0) as usize, ((x0 + w2 as isize).min(s.w as isize)).max(0) as usize);
            let d_lo = (c_lo as isize - x0) as usize;
            for ci in 0..s.cin {
                let chan = &x[(img * s.cin + ci) * s.h * s.w..][..s.h * s.w];
                // The tile rows' 4 input rows, zero-padded, in the scratch.
                for i in 0..4 {
                    let row = &mut rows[i * 2 * width..][..w2];
                    let y = (2 * ty + i) as isize - s.p as isize;
                    if y < 0 || y >= s.h as isize || c_hi <= c_lo {
                        row.fill(0.0);
                        continue;
                    }
                    row[..d_lo].fill(0.0);
                    row[d_lo..d_lo + c_hi - c_lo].copy_from_slice(&chan[y as usize * s.w + c_lo..][..c_hi - c_lo]);
                    row[d_lo + c_hi - c_lo..].fill(0.0);
                }
                let r0 = &rows[..w2];
                let r1 = &rows[2 * width..][..w2];
                let r2 = &rows[4 * width..][..w2];
                let r3 = &rows[6 * width..][..w2];
                // Bᵀ d down the columns, split into even and odd columns.
                {
                    let (e0, rest) = e.split_at_mut(width);
                    let (e1, rest) = rest.split_at_mut(width);
                    let (e2, e3) = rest.split_at_mut(width);
                    let (o0, rest) = o.split_at_mut(width);
                    let (o1, rest) = rest.split_at_mut(width);
                    let (o2, o3) = rest.split_at_mut(width);
                    let it = r0.chunks_exact(2).zip(r1.chunks_exact(2)).zip(r2.chunks_exact(2).zip(r3.chunks_exact(2)));
                    for (k, ((x0, x1), (x2, x3))) in it.enumerate() {
                        e0[k] = x0[0] - x2[0];
                        o0[k] = x0[1] - x2[1];
                        e1[k] = x1[0] + x2[0];
                        o1[k] = x1[1] + x2[1];
                        e2[k] = x2[0] - x1[0];
                        o2[k] = x2[1] - x1[1];
                        e3[k] = x1[0] - x3[0];
                        o3[k] = x1[1] - x3[1];
                    }
                }
                // ... B across the rows: tile k has columns e[k], o[k], e[k + 1], o[k + 1].
                let col = ci * n + off;
                for i in 0..4 {
                    let (ei, oi) = (&e[i * width..][..len + 1], &o[i * width..][..len + 1]);
                    let (v0, rest) = v[4 * i * plane + col..].split_at_mut(plane);
                    let (v1, rest) = rest.split_at_mut(plane);
                    let (v2, v3) = rest.split_at_mut(plane);
                    let (v0, v1, v2, v3) = (&mut v0[..len], &mut v1[..len], &mut v2[..len], &mut v3[..len]);
                    let (en, on) = (&ei[1..], &oi[1..]);
                    let (ei, oi) = (&ei[..len], &oi[..len]);
                    for k in 0..len {
                        v0[k] = ei[k] - en[k];
                        v1[k] = oi[k] + en[k];
                        v2[k] = en[k] - oi[k];
                        v3[k] = oi[k] - on[k];
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `out[img, c0 + co, 2ty.., 2tx..] = (Aᵀ M A) + bias` for tiles `t0..t1` and the block's
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
        scratch.resize(4 * txn, 0.0);
        for (img, ty, tx0, len, off) in runs((txn, tiles_per_img), range) {
            let oy = 2 * ty;
            // Tiles whose second column is inside the output.
            let full = len.min((wo - 2 * tx0) / 2);
            for (co, &bv) in bias.iter().enumerate() {
                let col = co * n + off;
                let mm: [&[f32]; 16] = std::array::from_fn(|xi| &m[xi * plane + col..][..len]);
                let base = ((img * cout + c0 + co) * ho + oy) * wo + 2 * tx0;
                for i in 0..2 {
                    if oy + i >= ho {
                        break;
                    }
                    // Aᵀ M, row i (m0 + m1 + m2 or m1 - m2 - m3), for the 4 columns.
                    let (a0, rest) = scratch[..4 * len].split_at_mut(len);
                    let (a1, rest) = rest.split_at_mut(len);
                    let (a2, a3) = rest.split_at_mut(len);
                    for (j, a) in [a0, a1, a2, a3].into_iter().enumerate() {
                        let (p, q, r) = (mm[j], mm[4 + j], mm[8 + j]);
                        if i == 0 {
                            for (((a, &p), &q), &r) in a.iter_mut().zip(p).zip(q).zip(r) {
                                *a = p + q + r;
                            }
                        } else {
                            let t = mm[12 + j];
                            for (((a, &q), &r), &t) in a.iter_mut().zip(q).zip(r).zip(t) {
                                *a = q - r - t;
                            }
                        }
                    }
                    let (a0, rest) = scratch[..4 * len].split_at(len);
                    let (a1, rest) = rest.split_at(len);
                    let (a2, a3) = rest.split_at(len);
                    // SAFETY: row oy + i of this channel, columns 2tx0 .. 2(tx0 + len) (clipped
                    // to W_o), belong to these tiles.
                    let row = unsafe { std::slice::from_raw_parts_mut(out.0.add(base + i * wo), (wo - 2 * tx0).min(2 * len)) };
                    let (pairs, tail) = row.split_at_mut(2 * full);
                    for ((((y, &a0), &a1), &a2), &a3) in pairs.chunks_exact_mut(2).zip(a0).zip(a1).zip(a2).zip(a3) {
                        y[0] = a0 + a1 + a2 + bv;
                        y[1] = a1 - a2 - a3 + bv;
                    }
                    if let Some(y) = tail.first_mut() {
                        *y = a0[full] + a1[full] + a2[full] + bv;
                    }
                }
            }
        }
    }
}
