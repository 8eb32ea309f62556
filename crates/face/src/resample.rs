//! Image resizing exactly as the reference pre-processing computes it: OpenCV's `cv2.resize`
//! (`INTER_LINEAR` on 8-bit images for SCRFD, `INTER_AREA` on 8-bit and float images for MTCNN)
//! and Pillow's `Image.resize` (`LANCZOS` for rembg's U²-Net, `BILINEAR`).
//!
//! Images here are interleaved row-major slices with `channels` values per pixel.

/// Fixed-point bits of OpenCV's 8-bit bilinear coefficients (`INTER_RESIZE_COEF_BITS`).
const COEF_BITS: u32 = 11;

/// `cv2.resize(src, (dw, dh))` with the default `INTER_LINEAR` on an 8-bit image.
///
/// OpenCV's fixed-point path: f32 source positions `(d + 0.5)·scale − 0.5` clamped to the image,
/// 11-bit coefficients, a horizontal pass in integers and the vertical pass of its SIMD kernel
/// (`((row >> 4)·β >> 16)` per tap, then `(sum + 2) >> 2`). An exact 2× reduction is an area
/// average, as OpenCV switches to `INTER_AREA` there; the same size is a copy.
pub fn resize_linear_u8(src: &[u8], (sw, sh): (usize, usize), channels: usize, (dw, dh): (usize, usize)) -> Vec<u8> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    if sw == 2 * dw && sh == 2 * dh {
        return resize_area_u8(src, (sw, sh), channels, (dw, dh));
    }
    bilinear_u8(src, (sw, sh), channels, (dw, dh), false)
}

/// The fixed-point bilinear kernel of [`resize_linear_u8`], with `INTER_AREA`'s enlargement
/// coordinates when `area_mode`.
fn bilinear_u8(
    src: &[u8],
    (sw, sh): (usize, usize),
    channels: usize,
    (dw, dh): (usize, usize),
    area_mode: bool,
) -> Vec<u8> {
    let (xs, xw) = linear_taps(sw, dw, area_mode, true);
    let (ys, yw) = linear_taps(sh, dh, area_mode, false);
    // Horizontal pass per source row, on demand (rows are reused by consecutive output rows).
    let hrow = |sy: usize| -> Vec<i32> {
        let row = &src[sy * sw * channels..(sy + 1) * sw * channels];
        let mut out = Vec::with_capacity(dw * channels);
        for (&x0, &[a0, a1]) in xs.iter().zip(&xw) {
            let (x0, x1) = (x0 as usize, clip(x0 + 1, sw));
            for c in 0..channels {
                out.push(i32::from(row[x0 * channels + c]) * a0 + i32::from(row[x1 * channels + c]) * a1);
            }
        }
        out
    };
    let mut dst = vec![0u8; dw * dh * channels];
    let mut cache: Vec<(usize, Vec<i32>)> = Vec::new(); // the last two horizontal rows
    for (dy, (&sy, &[b0, b1])) in ys.iter().zip(&yw).enumerate() {
        let (y0, y1) = (clip(sy, sh), clip(sy + 1, sh));
        for y in [y0, y1] {
            if !cache.iter().any(|(r, _)| *r == y) {
                if cache.len() == 2 {
                    cache.remove(0);
                }
                cache.push((y, hrow(y)));
            }
        }
        let row = |y: usize| &cache.iter().find(|(r, _)| *r == y).expect("cached above").1;
        let (r0, r1) = (row(y0), row(y1));
        let out = &mut dst[dy * dw * channels..(dy + 1) * dw * channels];
        for ((o, &v0), &v1) in out.iter_mut().zip(r0).zip(r1) {
            let t0 = (v0 >> 4).clamp(i32::from(i16::MIN), i32::from(i16::MAX));
            let t1 = (v1 >> 4).clamp(i32::from(i16::MIN), i32::from(i16::MAX));
            let sum = ((t0 * b0) >> 16) + ((t1 * b1) >> 16);
            *o = ((sum + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    dst
}

/// OpenCV's row clipping: `index` limited to `0..len`.
fn clip(index: i64, len: usize) -> usize {
    index.clamp(0, len as i64 - 1) as usize
}

/// Per output index: the first source index and the two 11-bit weights.
fn linear_taps(src: usize, dst: usize, area_mode: bool, clamp: bool) -> (Vec<i64>, Vec<[i32; 2]>) {
    let one = (1 << COEF_BITS) as f32;
    linear_fractions(src, dst, area_mode, clamp)
        .into_iter()
        .map(|(s, frac)| (s, [((1.0 - frac) * one).round_ties_even() as i32, (frac * one).round_ties_even() as i32]))
        .unzip()
}

/// OpenCV's bilinear source positions: per output index, the first source index and the f32
/// fraction. `area_mode` is `INTER_AREA` when enlarging: `floor(d·scale)` and the fraction of the
/// output cell past the next source cell. With `clamp` (OpenCV's horizontal axis) positions
/// outside the image are pinned to its edge with fraction 0; without (its vertical axis) they are
/// kept, and the caller clips the two row indices.
fn linear_fractions(src: usize, dst: usize, area_mode: bool, clamp: bool) -> Vec<(i64, f32)> {
    let inv_scale = dst as f64 / src as f64;
    let scale = 1.0 / inv_scale;
    (0..dst)
        .map(|d| {
            let (mut s, mut frac) = if area_mode {
                let s = (d as f64 * scale).floor();
                let f = ((d + 1) as f64 - (s + 1.0) * inv_scale) as f32;
                (s as f32, if f <= 0.0 { 0.0 } else { f - f.floor() })
            } else {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                (f.floor(), f - f.floor())
            };
            if clamp && s < 0.0 {
                (s, frac) = (0.0, 0.0);
            }
            if clamp && s >= (src - 1) as f32 {
                (s, frac) = ((src - 1) as f32, 0.0);
            }
            (s as i64, frac)
        })
        .collect()
}

/// One output index's source taps: `(source index, weight)`.
type AreaTaps = Vec<(usize, f32)>;

/// OpenCV's `computeResizeAreaTab`: the source cells each output cell covers, and their shares
/// (computed in f64, stored as f32 whatever the image type).
fn area_taps(src: usize, dst: usize) -> Vec<AreaTaps> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let fs1 = d as f64 * scale;
            let fs2 = fs1 + scale;
            let cell = scale.min(src as f64 - fs1);
            let s2 = (fs2.floor() as usize).min(src - 1);
            let s1 = (fs1.ceil() as usize).min(s2);
            let mut taps = Vec::new();
            if s1 as f64 - fs1 > 1e-3 {
                taps.push((s1 - 1, ((s1 as f64 - fs1) / cell) as f32));
            }
            for s in s1..s2 {
                taps.push((s, (1.0 / cell) as f32));
            }
            if fs2 - s2 as f64 > 1e-3 {
                taps.push((s2, ((fs2 - s2 as f64).min(1.0).min(cell) / cell) as f32));
            }
            taps
        })
        .collect()
}

/// `cv2.resize(src, (dw, dh), interpolation=cv2.INTER_AREA)` on an 8-bit image (a reduction).
///
/// Integer factors average whole blocks (`2×2`: `(sum + 2) >> 2`; others: `sum · (1/n)` rounded
/// half to even in f32); other factors weight the covered cells by area, accumulated in f32 as
/// OpenCV does, then rounded. An enlargement (on either axis) is OpenCV's bilinear kernel with
/// `INTER_AREA` coordinates.
pub fn resize_area_u8(src: &[u8], (sw, sh): (usize, usize), channels: usize, (dw, dh): (usize, usize)) -> Vec<u8> {
    if dw > sw || dh > sh {
        return bilinear_u8(src, (sw, sh), channels, (dw, dh), true);
    }
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let mut dst = vec![0u8; dw * dh * channels];
    if (sw, sh) == (2 * dw, 2 * dh) {
        // OpenCV's fast 2×2 average, `(sum + 2) >> 2`, row pair by row pair.
        let (src_row, dst_row) = (sw * channels, dw * channels);
        for (dy, out) in dst.chunks_exact_mut(dst_row).enumerate() {
            let top = &src[2 * dy * src_row..(2 * dy + 1) * src_row];
            let bottom = &src[(2 * dy + 1) * src_row..(2 * dy + 2) * src_row];
            match channels {
                3 => average_2x2::<3>(top, bottom, out),
                _ => {
                    for (i, d) in out.iter_mut().enumerate() {
                        let (x, c) = (2 * (i / channels) * channels, i % channels);
                        let sum = u32::from(top[x + c])
                            + u32::from(top[x + channels + c])
                            + u32::from(bottom[x + c])
                            + u32::from(bottom[x + channels + c]);
                        *d = ((sum + 2) >> 2) as u8;
                    }
                }
            }
        }
        return dst;
    }
    if sw.is_multiple_of(dw) && sh.is_multiple_of(dh) {
        let (fx, fy) = (sw / dw, sh / dh);
        let inv = 1.0 / (fx * fy) as f32;
        for dy in 0..dh {
            for dx in 0..dw {
                for c in 0..channels {
                    let mut sum = 0u32;
                    for y in dy * fy..(dy + 1) * fy {
                        for x in dx * fx..(dx + 1) * fx {
                            sum += u32::from(src[(y * sw + x) * channels + c]);
                        }
                    }
                    dst[(dy * dw + dx) * channels + c] = if (fx, fy) == (2, 2) {
                        ((sum + 2) >> 2) as u8
                    } else {
                        (sum as f32 * inv).round_ties_even().min(255.0) as u8
                    };
                }
            }
        }
        return dst;
    }
    let sums = area_generic(|i| f32::from(src[i]), (sw, sh), channels, (dw, dh), |w| w);
    for (d, s) in dst.iter_mut().zip(sums) {
        *d = s.round_ties_even().clamp(0.0, 255.0) as u8;
    }
    dst
}

/// One output row of the 2× area reduction for `C` channels: each value the rounded mean of a
/// 2×2 block of the `top` and `bottom` source rows.
fn average_2x2<const C: usize>(top: &[u8], bottom: &[u8], out: &mut [u8]) {
    let pairs = top.chunks_exact(2 * C).zip(bottom.chunks_exact(2 * C));
    for (px, (t, b)) in out.chunks_exact_mut(C).zip(pairs) {
        for c in 0..C {
            let sum = u16::from(t[c]) + u16::from(t[C + c]) + u16::from(b[c]) + u16::from(b[C + c]);
            px[c] = ((sum + 2) >> 2) as u8;
        }
    }
}

/// `cv2.resize(src, (dw, dh), interpolation=cv2.INTER_AREA)` on a float64 image: area weights for
/// a reduction, bilinear (f32 coefficients) for an enlargement, as OpenCV computes them.
pub fn resize_area_f64(src: &[f64], (sw, sh): (usize, usize), channels: usize, (dw, dh): (usize, usize)) -> Vec<f64> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    if dw > sw || dh > sh {
        return resize_linear_f64(src, (sw, sh), channels, (dw, dh));
    }
    area_generic(|i| src[i], (sw, sh), channels, (dw, dh), f64::from)
}

/// Area-weighted reduction with accumulator type `T` (f32 for 8-bit sources, f64 for f64 ones):
/// per output row, horizontal sums of each covered source row, accumulated with their row shares.
fn area_generic<T>(
    at: impl Fn(usize) -> T,
    (sw, sh): (usize, usize),
    channels: usize,
    (dw, dh): (usize, usize),
    weight: impl Fn(f32) -> T,
) -> Vec<T>
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    let xt = area_taps(sw, dw);
    let yt = area_taps(sh, dh);
    let mut out = vec![T::default(); dw * dh * channels];
    let mut row = vec![T::default(); dw * channels];
    for (dy, ytaps) in yt.iter().enumerate() {
        let acc = &mut out[dy * dw * channels..(dy + 1) * dw * channels];
        for (k, &(sy, beta)) in ytaps.iter().enumerate() {
            for (dx, xtaps) in xt.iter().enumerate() {
                for c in 0..channels {
                    let mut s = T::default();
                    for &(sx, alpha) in xtaps {
                        s = s + at((sy * sw + sx) * channels + c) * weight(alpha);
                    }
                    row[dx * channels + c] = s;
                }
            }
            let beta = weight(beta);
            for (a, &r) in acc.iter_mut().zip(&row) {
                *a = if k == 0 { r * beta } else { *a + r * beta };
            }
        }
    }
    out
}

/// `cv2.resize` `INTER_AREA` enlargement on a float64 image: bilinear with `INTER_AREA`'s
/// coordinates, f32 coefficients, f64 arithmetic.
fn resize_linear_f64(src: &[f64], (sw, sh): (usize, usize), channels: usize, (dw, dh): (usize, usize)) -> Vec<f64> {
    let (xt, yt) = (linear_fractions(sw, dw, true, true), linear_fractions(sh, dh, true, false));
    let mut out = vec![0.0; dw * dh * channels];
    for (dy, &(sy, fy)) in yt.iter().enumerate() {
        let (y0, y1) = (clip(sy, sh), clip(sy + 1, sh));
        let (b0, b1) = (f64::from(1.0 - fy), f64::from(fy));
        for (dx, &(x0, fx)) in xt.iter().enumerate() {
            let (x0, x1) = (x0 as usize, clip(x0 + 1, sw));
            let (a0, a1) = (f64::from(1.0 - fx), f64::from(fx));
            for c in 0..channels {
                let p = |x: usize, y: usize| src[(y * sw + x) * channels + c];
                let r0 = p(x0, y0) * a0 + p(x1, y0) * a1;
                let r1 = p(x0, y1) * a0 + p(x1, y1) * a1;
                out[(dy * dw + dx) * channels + c] = r0 * b0 + r1 * b1;
            }
        }
    }
    out
}

/// A Pillow resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilFilter {
    /// `Image.BILINEAR` (triangle, support 1).
    Bilinear,
    /// `Image.BICUBIC` (Keys cubic with `a = -0.5`, support 2; `Image.resize`'s default).
    Bicubic,
    /// `Image.LANCZOS` (Lanczos-3).
    Lanczos,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
        match self {
            Self::Bilinear => (1.0 - x.abs()).max(0.0),
            Self::Bicubic => {
                let (a, x) = (-0.5, x.abs());
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Self::Lanczos if (-3.0..3.0).contains(&x) => sinc(x) * sinc(x / 3.0),
            Self::Lanczos => 0.0,
        }
    }
}

/// Fixed-point bits of Pillow's 8-bit resampling coefficients (`PRECISION_BITS`).
const PIL_BITS: u32 = 22;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index, the first source
/// index and the fixed-point weights.
fn pil_taps(src: usize, dst: usize, filter: PilFilter) -> Vec<(usize, Vec<i64>)> {
    let scale = src as f64 / dst as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..dst)
        .map(|d| {
            let center = (d as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(src as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| filter.weight((x as f64 - center + 0.5) / filterscale)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    let v = k * f64::from(1u32 << PIL_BITS);
                    (if k < 0.0 { v - 0.5 } else { v + 0.5 }) as i64
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// `Image.resize((dw, dh), filter)` of Pillow on an 8-bit image (`L`, `RGB`, ...): a horizontal
/// then a vertical pass, each with 22-bit fixed-point weights, rounding and clamping to 8 bits in
/// between, as Pillow does. A pass whose size is unchanged is skipped, as in Pillow.
pub fn resize_pil_u8(
    src: &[u8],
    (sw, sh): (usize, usize),
    channels: usize,
    (dw, dh): (usize, usize),
    filter: PilFilter,
) -> Vec<u8> {
    let clip = |v: i64| (v >> PIL_BITS).clamp(0, 255) as u8;
    let half = 1i64 << (PIL_BITS - 1);
    let horizontal = if dw != sw {
        let taps = pil_taps(sw, dw, filter);
        let mut out = vec![0u8; dw * sh * channels];
        for y in 0..sh {
            for (dx, (x0, k)) in taps.iter().enumerate() {
                for c in 0..channels {
                    let s = k
                        .iter()
                        .enumerate()
                        .fold(half, |s, (i, &w)| s + i64::from(src[(y * sw + x0 + i) * channels + c]) * w);
                    out[(y * dw + dx) * channels + c] = clip(s);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    if dh == sh {
        return horizontal;
    }
    let taps = pil_taps(sh, dh, filter);
    let mut out = vec![0u8; dw * dh * channels];
    for (dy, (y0, k)) in taps.iter().enumerate() {
        for i in 0..dw * channels {
            let s = k
                .iter()
                .enumerate()
                .fold(half, |s, (j, &w)| s + i64::from(horizontal[(y0 + j) * dw * channels + i]) * w);
            out[dy * dw * channels + i] = clip(s);
        }
    }
    out
}
