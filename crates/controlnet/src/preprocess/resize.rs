//! `cv2.resize` on 8-bit images: nearest, bicubic, Lanczos-4 and area interpolation with OpenCV's
//! coefficients, fixed-point rounding and border handling, so that preprocessors built from resizes
//! (the colour map, `tile_resample`, the annotators' resolution step) match the Python ones.
//!
//! - Nearest: `src = floor(dst · (1 / (dst_len / src_len)))`, clamped.
//! - Bicubic (A = −0.75) and Lanczos-4: pixel-centre mapping, coefficients rounded to 11-bit
//!   fixed point, replicated borders, `(Σ + 2²¹) >> 22`.
//! - Area: exact pixel-area weights when shrinking (integer factors averaged in integers); when a side
//!   grows, OpenCV's area-flavoured bilinear weights.

use image::{ImageBuffer, Pixel};

use super::PreprocessError;

/// An interpolation of `cv2.resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// `cv2.INTER_NEAREST`.
    Nearest,
    /// `cv2.INTER_CUBIC`.
    Cubic,
    /// `cv2.INTER_AREA`.
    Area,
    /// `cv2.INTER_LANCZOS4`.
    Lanczos4,
}

/// Fixed-point scale of the separable filters' coefficients (OpenCV's `INTER_RESIZE_COEF_SCALE`).
const COEF_SCALE: f32 = 2048.0;

/// `cv2.resize(image, (width, height), interpolation)` on an 8-bit image of any channel count.
pub fn resize<P>(
    image: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    interpolation: Interpolation,
) -> Result<ImageBuffer<P, Vec<u8>>, PreprocessError>
where
    P: Pixel<Subpixel = u8>,
{
    let (src_w, src_h) = image.dimensions();
    if src_w == 0 || src_h == 0 || width == 0 || height == 0 {
        return Err(PreprocessError::EmptySize { from: (src_w, src_h), to: (width, height) });
    }
    let cn = usize::from(P::CHANNEL_COUNT);
    let src = Plane { data: image.as_raw(), width: src_w as usize, height: src_h as usize, cn };
    let (dw, dh) = (width as usize, height as usize);
    let data = if (dw, dh) == (src.width, src.height) {
        image.as_raw().clone()
    } else {
        match interpolation {
            Interpolation::Nearest => nearest(&src, dw, dh),
            // opencv-python runs 8-bit bicubic through IPP, which equals OpenCV's float path rounded.
            Interpolation::Cubic => separable_float(&src, dw, dh, Kernel::Cubic),
            Interpolation::Lanczos4 => separable(&src, dw, dh, Kernel::Lanczos4),
            Interpolation::Area => area(&src, dw, dh),
        }
    };
    Ok(ImageBuffer::from_raw(width, height, data).expect("buffer has width * height * channels bytes"))
}

/// The annotators' `resize_image(image, resolution)` (EasyPhoto, controlnet_aux): short side to
/// `resolution`, both sides rounded (half to even) to multiples of 64; Lanczos-4 when the image grows,
/// area otherwise.
pub fn resize_short_side<P>(
    image: &ImageBuffer<P, Vec<u8>>,
    resolution: u32,
) -> Result<ImageBuffer<P, Vec<u8>>, PreprocessError>
where
    P: Pixel<Subpixel = u8>,
{
    let (w, h) = image.dimensions();
    let k = f64::from(resolution) / f64::from(w.min(h));
    let round64 = |side: u32| ((f64::from(side) * k / 64.0).round_ties_even() * 64.0) as u32;
    let interpolation = if k > 1.0 { Interpolation::Lanczos4 } else { Interpolation::Area };
    resize(image, round64(w), round64(h), interpolation)
}

/// An interleaved 8-bit image.
struct Plane<'a> {
    data: &'a [u8],
    width: usize,
    height: usize,
    cn: usize,
}

impl Plane<'_> {
    fn row(&self, y: usize) -> &[u8] {
        let stride = self.width * self.cn;
        &self.data[y * stride..(y + 1) * stride]
    }
}

fn nearest(src: &Plane, dw: usize, dh: usize) -> Vec<u8> {
    let cn = src.cn;
    let map = |dst_len: usize, src_len: usize| -> Vec<usize> {
        let inv = 1.0 / (dst_len as f64 / src_len as f64);
        (0..dst_len).map(|d| ((d as f64 * inv).floor() as usize).min(src_len - 1)).collect()
    };
    let xs = map(dw, src.width);
    let ys = map(dh, src.height);
    let mut out = Vec::with_capacity(dw * dh * cn);
    for &sy in &ys {
        let row = src.row(sy);
        for &sx in &xs {
            out.extend_from_slice(&row[sx * cn..(sx + 1) * cn]);
        }
    }
    out
}

/// The separable filters of `cv2.resize`.
#[derive(Clone, Copy)]
enum Kernel {
    Cubic,
    Lanczos4,
    /// Bilinear with the area-mode offsets (`INTER_AREA` when a side grows).
    AreaLinear,
}

impl Kernel {
    fn taps(self) -> usize {
        match self {
            Kernel::Cubic => 4,
            Kernel::Lanczos4 => 8,
            Kernel::AreaLinear => 2,
        }
    }
}

fn cubic_coefficients(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

fn lanczos4_coefficients(x: f32) -> [f32; 8] {
    use std::f64::consts::{FRAC_1_SQRT_2 as S45, PI};
    const CS: [[f64; 2]; 8] =
        [[1.0, 0.0], [-S45, -S45], [0.0, 1.0], [S45, -S45], [-1.0, 0.0], [S45, S45], [0.0, -1.0], [-S45, S45]];
    let y0 = -(f64::from(x) + 3.0) * PI * 0.25;
    let (s0, c0) = y0.sin_cos();
    let mut coeffs = [0f32; 8];
    let mut sum = 0f32;
    for (i, c) in coeffs.iter_mut().enumerate() {
        let t = x + 3.0 - i as f32;
        *c = if t.abs() >= 1e-6 {
            let y = -f64::from(t) * PI * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += *c;
    }
    let inv = 1.0 / sum;
    coeffs.map(|c| c * inv)
}

/// Source position of every destination index along one axis: the index of the tap left of the
/// sample point, and the fraction past it (OpenCV's `sx`, `fx`, clamped as OpenCV clamps them).
fn axis_positions(src_len: usize, dst_len: usize, kernel: Kernel) -> Vec<(isize, f32)> {
    let inv_scale = dst_len as f64 / src_len as f64;
    let scale = 1.0 / inv_scale;
    (0..dst_len)
        .map(|d| match kernel {
            Kernel::AreaLinear => {
                let s = (d as f64 * scale).floor() as isize;
                let f = ((d + 1) as f64 - (s + 1) as f64 * inv_scale) as f32;
                let f = if f <= 0.0 { 0.0 } else { f - f.floor() };
                if s < 0 {
                    (0, 0.0)
                } else if s >= src_len as isize - 1 {
                    (src_len as isize - 1, 0.0)
                } else {
                    (s, f)
                }
            }
            _ => {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let s = f.floor();
                (s as isize, f - s)
            }
        })
        .collect()
}

/// The filter's float coefficients at fraction `f`.
fn coefficients(kernel: Kernel, f: f32) -> Vec<f32> {
    match kernel {
        Kernel::Cubic => cubic_coefficients(f).to_vec(),
        Kernel::Lanczos4 => lanczos4_coefficients(f).to_vec(),
        Kernel::AreaLinear => vec![1.0 - f, f],
    }
}

/// First source index and float weights of every destination index along one axis.
fn axis_taps_f32(src_len: usize, dst_len: usize, kernel: Kernel) -> (Vec<isize>, Vec<f32>) {
    let back = kernel.taps() as isize / 2 - 1;
    let positions = axis_positions(src_len, dst_len, kernel);
    let first = positions.iter().map(|&(s, _)| s - back).collect();
    let weights = positions.iter().flat_map(|&(_, f)| coefficients(kernel, f)).collect();
    (first, weights)
}

/// First source index and fixed-point weights (× 2048, rounded) of every destination index.
fn axis_taps(src_len: usize, dst_len: usize, kernel: Kernel) -> (Vec<isize>, Vec<i32>) {
    let (first, weights) = axis_taps_f32(src_len, dst_len, kernel);
    (first, weights.into_iter().map(|c| (c * COEF_SCALE).round_ties_even() as i32).collect())
}

/// Bicubic / Lanczos-4 / area-bilinear: a horizontal pass into 32-bit rows, then a vertical pass.
fn separable(src: &Plane, dw: usize, dh: usize, kernel: Kernel) -> Vec<u8> {
    let cn = src.cn;
    let taps = kernel.taps();
    let (x_first, alpha) = axis_taps(src.width, dw, kernel);
    let (y_first, beta) = axis_taps(src.height, dh, kernel);
    let clamp = |i: isize, len: usize| i.clamp(0, len as isize - 1) as usize;
    // Source columns of every (dst x, tap), replicated at the borders.
    let columns: Vec<usize> =
        x_first.iter().flat_map(|&first| (0..taps).map(move |k| clamp(first + k as isize, src.width))).collect();
    // Only the source rows some destination row reads.
    let mut needed = vec![false; src.height];
    for &first in &y_first {
        for k in 0..taps {
            needed[clamp(first + k as isize, src.height)] = true;
        }
    }
    let horizontal: Vec<Vec<i32>> = (0..src.height)
        .map(|y| {
            if !needed[y] {
                return Vec::new();
            }
            let row = src.row(y);
            let mut out = vec![0i32; dw * cn];
            match cn {
                1 => filter_row::<1>(row, &columns, &alpha, taps, &mut out),
                3 => filter_row::<3>(row, &columns, &alpha, taps, &mut out),
                4 => filter_row::<4>(row, &columns, &alpha, taps, &mut out),
                _ => filter_row_any(row, cn, &columns, &alpha, taps, &mut out),
            }
            out
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh * cn);
    for dy in 0..dh {
        let rows: Vec<&[i32]> =
            (0..taps).map(|k| horizontal[clamp(y_first[dy] + k as isize, src.height)].as_slice()).collect();
        let b = &beta[dy * taps..(dy + 1) * taps];
        let width = dw * cn;
        // OpenCV's SIMD rows of the bilinear pass: 16-bit high products of (S >> 4) and the weights,
        // then (t + 2) >> 2; the last width % 4 values, and the other filters, in 32-bit fixed point.
        let simd = if let Kernel::AreaLinear = kernel { width / 4 * 4 } else { 0 };
        let high = |v: i32, w: i32| ((v >> 4).clamp(-32768, 32767) * w) >> 16;
        if simd > 0 {
            let pairs = rows[0][..simd].iter().zip(&rows[1][..simd]);
            out.extend(pairs.map(|(&r0, &r1)| ((high(r0, b[0]) + high(r1, b[1]) + 2) >> 2).clamp(0, 255) as u8));
        }
        let mut acc = vec![1i64 << 21; width - simd];
        for (row, &weight) in rows.iter().zip(b) {
            acc.iter_mut().zip(&row[simd..]).for_each(|(a, &v)| *a += i64::from(v) * i64::from(weight));
        }
        out.extend(acc.into_iter().map(|v| (v >> 22).clamp(0, 255) as u8));
    }
    out
}

/// A separable filter in f32 with float coefficients, rounded half to even at the end.
fn separable_float(src: &Plane, dw: usize, dh: usize, kernel: Kernel) -> Vec<u8> {
    let cn = src.cn;
    let mut planes = vec![Vec::with_capacity(src.width * src.height); cn];
    for px in src.data.chunks_exact(cn) {
        planes.iter_mut().zip(px).for_each(|(plane, &v)| plane.push(f32::from(v)));
    }
    let mut out = vec![0u8; dw * dh * cn];
    for (c, plane) in planes.iter().enumerate() {
        let resized = separable_map(plane, src.width, src.height, dw, dh, kernel);
        for (o, v) in out.iter_mut().skip(c).step_by(cn).zip(resized) {
            *o = round_half_even(v).clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// `v.round_ties_even()` for |v| < 2²², without a libm call: adding and removing 1.5 · 2²³ leaves
/// the rounding to the FPU's default round-to-nearest-even mode.
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if v.abs() < 4_194_304.0 { (v + MAGIC) - MAGIC } else { v.round_ties_even() }
}

/// One row of the horizontal pass for `CN` interleaved channels (a constant, so the channel loop
/// unrolls).
fn filter_row<const CN: usize>(row: &[u8], columns: &[usize], alpha: &[i32], taps: usize, out: &mut [i32]) {
    for ((px, cols), w) in out.chunks_exact_mut(CN).zip(columns.chunks_exact(taps)).zip(alpha.chunks_exact(taps)) {
        let mut acc = [0i32; CN];
        for (&sx, &a) in cols.iter().zip(w) {
            let src: &[u8; CN] = row[sx * CN..sx * CN + CN].try_into().expect("CN bytes");
            for c in 0..CN {
                acc[c] += i32::from(src[c]) * a;
            }
        }
        px.copy_from_slice(&acc);
    }
}

/// [`filter_row`] for any channel count.
fn filter_row_any(row: &[u8], cn: usize, columns: &[usize], alpha: &[i32], taps: usize, out: &mut [i32]) {
    for ((px, cols), w) in out.chunks_exact_mut(cn).zip(columns.chunks_exact(taps)).zip(alpha.chunks_exact(taps)) {
        for (&sx, &a) in cols.iter().zip(w) {
            px.iter_mut().zip(&row[sx * cn..(sx + 1) * cn]).for_each(|(o, &v)| *o += i32::from(v) * a);
        }
    }
}

/// One contribution of a source index to a destination index (OpenCV's `DecimateAlpha`).
struct AreaTap {
    dst: usize,
    src: usize,
    alpha: f32,
}

fn area_taps(src_len: usize, dst_len: usize, scale: f64) -> Vec<AreaTap> {
    let mut taps = Vec::with_capacity(src_len * 2);
    for d in 0..dst_len {
        let f1 = d as f64 * scale;
        let f2 = f1 + scale;
        let cell = scale.min(src_len as f64 - f1);
        let s2 = (f2.floor() as usize).min(src_len - 1);
        let s1 = (f1.ceil() as usize).min(s2);
        if s1 as f64 - f1 > 1e-3 {
            taps.push(AreaTap { dst: d, src: s1 - 1, alpha: ((s1 as f64 - f1) / cell) as f32 });
        }
        for s in s1..s2 {
            taps.push(AreaTap { dst: d, src: s, alpha: (1.0 / cell) as f32 });
        }
        if f2 - s2 as f64 > 1e-3 {
            taps.push(AreaTap { dst: d, src: s2, alpha: ((f2 - s2 as f64).min(1.0).min(cell) / cell) as f32 });
        }
    }
    taps
}

fn area(src: &Plane, dw: usize, dh: usize) -> Vec<u8> {
    let scale_x = src.width as f64 / dw as f64;
    let scale_y = src.height as f64 / dh as f64;
    if scale_x < 1.0 || scale_y < 1.0 {
        return separable(src, dw, dh, Kernel::AreaLinear);
    }
    let (ix, iy) = (scale_x.round(), scale_y.round());
    if (scale_x - ix).abs() < f64::EPSILON && (scale_y - iy).abs() < f64::EPSILON {
        return area_integer(src, dw, dh, ix as usize, iy as usize);
    }
    let cn = src.cn;
    let xtab = area_taps(src.width, dw, scale_x);
    let ytab = area_taps(src.height, dh, scale_y);
    let mut out = vec![0u8; dw * dh * cn];
    let mut buf = vec![0f32; dw * cn];
    let mut sum = vec![0f32; dw * cn];
    let mut prev_dy = None;
    for t in &ytab {
        let row = src.row(t.src);
        buf.fill(0.0);
        for x in &xtab {
            for c in 0..cn {
                buf[x.dst * cn + c] += f32::from(row[x.src * cn + c]) * x.alpha;
            }
        }
        if prev_dy != Some(t.dst) {
            if let Some(dy) = prev_dy {
                store_rounded(&mut out[dy * dw * cn..(dy + 1) * dw * cn], &sum);
            }
            sum.iter_mut().zip(&buf).for_each(|(s, &b)| *s = t.alpha * b);
            prev_dy = Some(t.dst);
        } else {
            sum.iter_mut().zip(&buf).for_each(|(s, &b)| *s += t.alpha * b);
        }
    }
    if let Some(dy) = prev_dy {
        store_rounded(&mut out[dy * dw * cn..(dy + 1) * dw * cn], &sum);
    }
    out
}

fn store_rounded(dst: &mut [u8], values: &[f32]) {
    for (d, &v) in dst.iter_mut().zip(values) {
        *d = v.round_ties_even().clamp(0.0, 255.0) as u8;
    }
}

/// Shrinking by whole factors: the mean of each `ix × iy` cell (OpenCV's fast area path).
fn area_integer(src: &Plane, dw: usize, dh: usize, ix: usize, iy: usize) -> Vec<u8> {
    let cn = src.cn;
    let area = (ix * iy) as u32;
    let halves = ix == 2 && iy == 2;
    let mut out = Vec::with_capacity(dw * dh * cn);
    for dy in 0..dh {
        for dx in 0..dw {
            for c in 0..cn {
                let mut total = 0u32;
                for y in dy * iy..(dy + 1) * iy {
                    let row = src.row(y);
                    for x in dx * ix..(dx + 1) * ix {
                        total += u32::from(row[x * cn + c]);
                    }
                }
                out.push(if halves {
                    ((total + 2) >> 2) as u8
                } else {
                    (total as f32 * (1.0 / area as f32)).round_ties_even().min(255.0) as u8
                });
            }
        }
    }
    out
}

/// `cv2.resize` of a single-channel f32 map (OpenCV's float path: unrounded coefficients, float
/// sums), for network outputs such as OpenPose's heat maps. Nearest is not offered.
pub fn resize_map(
    map: &[f32],
    width: usize,
    height: usize,
    dst_width: usize,
    dst_height: usize,
    interpolation: Interpolation,
) -> Result<Vec<f32>, PreprocessError> {
    let size = |w: usize, h: usize| (w as u32, h as u32);
    if width == 0 || height == 0 || dst_width == 0 || dst_height == 0 || map.len() != width * height {
        return Err(PreprocessError::EmptySize { from: size(width, height), to: size(dst_width, dst_height) });
    }
    if (width, height) == (dst_width, dst_height) {
        return Ok(map.to_vec());
    }
    let kernel = match interpolation {
        Interpolation::Cubic => Kernel::Cubic,
        Interpolation::Lanczos4 => Kernel::Lanczos4,
        Interpolation::Area => {
            let (sx, sy) = (width as f64 / dst_width as f64, height as f64 / dst_height as f64);
            if sx >= 1.0 && sy >= 1.0 {
                return Ok(area_map(map, width, height, dst_width, dst_height, sx, sy));
            }
            Kernel::AreaLinear
        }
        Interpolation::Nearest => {
            return Err(PreprocessError::InvalidParameter {
                name: "interpolation",
                reason: "nearest is not implemented for float maps".into(),
            });
        }
    };
    Ok(separable_map(map, width, height, dst_width, dst_height, kernel))
}

fn separable_map(map: &[f32], w: usize, h: usize, dw: usize, dh: usize, kernel: Kernel) -> Vec<f32> {
    let taps = kernel.taps();
    let (x_first, alpha) = axis_taps_f32(w, dw, kernel);
    let (y_first, beta) = axis_taps_f32(h, dh, kernel);
    let clamp = |i: isize, len: usize| i.clamp(0, len as isize - 1) as usize;
    let columns: Vec<usize> =
        x_first.iter().flat_map(|&first| (0..taps).map(move |k| clamp(first + k as isize, w))).collect();
    let mut needed = vec![false; h];
    for &first in &y_first {
        (0..taps).for_each(|k| needed[clamp(first + k as isize, h)] = true);
    }
    let horizontal: Vec<Vec<f32>> = (0..h)
        .map(|y| {
            if !needed[y] {
                return Vec::new();
            }
            let row = &map[y * w..(y + 1) * w];
            let mut out = vec![0f32; dw];
            for ((o, cols), a) in out.iter_mut().zip(columns.chunks_exact(taps)).zip(alpha.chunks_exact(taps)) {
                *o = cols.iter().zip(a).fold(0.0f32, |acc, (&sx, &wt)| acc + row[sx] * wt);
            }
            out
        })
        .collect();
    let mut out = Vec::with_capacity(dw * dh);
    for dy in 0..dh {
        let b = &beta[dy * taps..(dy + 1) * taps];
        let rows: Vec<&[f32]> = (0..taps).map(|k| horizontal[clamp(y_first[dy] + k as isize, h)].as_slice()).collect();
        let mut acc: Vec<f32> = rows[0].iter().map(|&v| v * b[0]).collect();
        for (row, &weight) in rows.iter().zip(b).skip(1) {
            acc.iter_mut().zip(row.iter()).for_each(|(a, &v)| *a += v * weight);
        }
        out.extend(acc);
    }
    out
}

fn area_map(map: &[f32], w: usize, h: usize, dw: usize, dh: usize, sx: f64, sy: f64) -> Vec<f32> {
    let xtab = area_taps(w, dw, sx);
    let ytab = area_taps(h, dh, sy);
    let mut out = vec![0f32; dw * dh];
    let mut buf = vec![0f32; dw];
    let mut sum = vec![0f32; dw];
    let mut prev_dy = None;
    for t in &ytab {
        let row = &map[t.src * w..(t.src + 1) * w];
        buf.fill(0.0);
        for x in &xtab {
            buf[x.dst] += row[x.src] * x.alpha;
        }
        if prev_dy != Some(t.dst) {
            if let Some(dy) = prev_dy {
                out[dy * dw..(dy + 1) * dw].copy_from_slice(&sum);
            }
            sum.iter_mut().zip(&buf).for_each(|(s, &b)| *s = t.alpha * b);
            prev_dy = Some(t.dst);
        } else {
            sum.iter_mut().zip(&buf).for_each(|(s, &b)| *s += t.alpha * b);
        }
    }
    if let Some(dy) = prev_dy {
        out[dy * dw..(dy + 1) * dw].copy_from_slice(&sum);
    }
    out
}
