//! Mask morphology and blurs with OpenCV's exact semantics (`cv2.dilate`, `cv2.erode`,
//! `cv2.morphologyEx(MORPH_CLOSE)`, `cv2.blur`), as EasyPhoto applies them with `np.ones((k, k))`
//! kernels.
//!
//! Kernels are `kw × kh` rectangles anchored at `(kw / 2, kh / 2)`, so an even kernel reaches one
//! pixel further up and left than down and right. Morphology ignores pixels outside the image;
//! the box blur reflects the image without repeating the edge (`BORDER_REFLECT_101`).

use image::{ImageBuffer, Luma, Primitive};

use crate::FaceError;

/// A one-channel image with samples of type `T` (`u8` masks, `f32` blend weights).
pub type Plane<T> = ImageBuffer<Luma<T>, Vec<T>>;

/// `cv2.dilate(src, np.ones((kh, kw)))`: each pixel becomes the maximum over the kernel window.
///
/// A 0 in either size means 3 × 3, as OpenCV does for the empty kernel `np.ones((0, 0))` that
/// EasyPhoto's `face_width // 10` gives for faces under 10 pixels.
pub fn dilate<T: Primitive>(src: &Plane<T>, kw: u32, kh: u32) -> Plane<T> {
    let (kw, kh) = kernel_or_3x3(kw, kh);
    separable(src, kw, kh, |a, b| if b > a { b } else { a })
}

/// `cv2.erode(src, np.ones((kh, kw)))`: each pixel becomes the minimum over the kernel window
/// (0 sizes as in [`dilate`]).
pub fn erode<T: Primitive>(src: &Plane<T>, kw: u32, kh: u32) -> Plane<T> {
    let (kw, kh) = kernel_or_3x3(kw, kh);
    separable(src, kw, kh, |a, b| if b < a { b } else { a })
}

/// `cv2.morphologyEx(src, cv2.MORPH_CLOSE, np.ones((kh, kw)))`: [`dilate`] then [`erode`], which
/// fills holes and gaps narrower than the kernel.
pub fn close<T: Primitive>(src: &Plane<T>, kw: u32, kh: u32) -> Plane<T> {
    erode(&dilate(src, kw, kh), kw, kh)
}

fn kernel_or_3x3(kw: u32, kh: u32) -> (u32, u32) {
    if kw == 0 || kh == 0 { (3, 3) } else { (kw, kh) }
}

/// A rectangular max or min filter as a row pass then a column pass (exact for min and max).
fn separable<T: Primitive>(src: &Plane<T>, kw: u32, kh: u32, pick: impl Fn(T, T) -> T + Copy) -> Plane<T> {
    let (w, h) = (src.width() as usize, src.height() as usize);
    let mut rows = vec![T::DEFAULT_MIN_VALUE; w * h];
    for (line, out) in src.as_raw().chunks_exact(w.max(1)).zip(rows.chunks_exact_mut(w.max(1))) {
        window_extreme(line, 1, out, 1, w, kw as usize, pick);
    }
    let mut dst = vec![T::DEFAULT_MIN_VALUE; w * h];
    for x in 0..w {
        window_extreme(&rows[x..], w, &mut dst[x..], w, h, kh as usize, pick);
    }
    Plane::from_raw(w as u32, h as u32, dst).expect("buffer sized to the image")
}

/// `out[i] = pick over line[i - k/2 ..= i + k - 1 - k/2]` (clipped to the line), with strides.
fn window_extreme<T: Copy>(
    line: &[T],
    in_stride: usize,
    out: &mut [T],
    out_stride: usize,
    len: usize,
    k: usize,
    pick: impl Fn(T, T) -> T,
) {
    let before = k / 2;
    let after = k - 1 - before;
    for i in 0..len {
        let (lo, hi) = (i.saturating_sub(before), (i + after).min(len - 1));
        let mut acc = line[lo * in_stride];
        for j in lo + 1..=hi {
            acc = pick(acc, line[j * in_stride]);
        }
        out[i * out_stride] = acc;
    }
}

/// A sample type [`box_blur`] averages: window sums are exact in f64, then stored back as OpenCV does.
pub trait BlurSample: Primitive {
    /// The stored mean of a window whose samples sum to `sum` over `area` pixels.
    fn from_sum(sum: f64, area: usize) -> Self;
}

impl BlurSample for u8 {
    /// For windows of up to 256 pixels OpenCV divides in 23-bit fixed point (`(s + δ) · m >> 23`,
    /// which rounds halves up and can round up sums just under a half); above, `s · (1/area)`
    /// rounded half to even.
    fn from_sum(sum: f64, area: usize) -> Self {
        let s = sum as u64;
        if area == 1 {
            return s.min(255) as u8;
        }
        if area <= 256 {
            let exact = f64::from(1u32 << 23) / area as f64;
            let (mut mul, mut delta) = (exact.floor() as u64, area as u64 / 2);
            if exact - exact.floor() < 0.5 {
                delta += 1;
            } else {
                mul += 1;
            }
            return (((s + delta) * mul) >> 23).min(255) as u8;
        }
        (sum * (1.0 / area as f64)).round_ties_even().clamp(0.0, 255.0) as u8
    }
}

impl BlurSample for f32 {
    fn from_sum(sum: f64, area: usize) -> Self {
        (sum * (1.0 / area as f64)) as f32
    }
}

impl BlurSample for f64 {
    fn from_sum(sum: f64, area: usize) -> Self {
        sum * (1.0 / area as f64)
    }
}

/// `cv2.blur(src, (kw, kh))`: the mean over a `kw × kh` window, with `BORDER_REFLECT_101`
/// (`…, 2, 1 | 0, 1, 2, … | n-2, n-3, …`). EasyPhoto feathers masks with it (`(8, 8)` for face
/// fusion, `(32, 32)` for colour shift and paste-back). Errors if a size is 0.
pub fn box_blur<T: BlurSample>(src: &Plane<T>, kw: u32, kh: u32) -> Result<Plane<T>, FaceError> {
    if kw == 0 || kh == 0 {
        return Err(FaceError::InvalidInput { what: format!("box_blur: kernel {kw}x{kh} has a zero side") });
    }
    let (w, h) = (src.width() as usize, src.height() as usize);
    if w == 0 || h == 0 {
        return Ok(src.clone());
    }
    let (kw, kh) = (kw as usize, kh as usize);
    let src = src.as_raw();
    // Row sums over each horizontal window, then column sums of those.
    let mut rows = vec![0f64; w * h];
    let xs: Vec<usize> = window_indices(w, kw);
    let mut padded = vec![0f64; xs.len()];
    for (line, out) in src.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
        padded.iter_mut().zip(&xs).for_each(|(p, &i)| *p = line[i].to_f64().unwrap_or(0.0));
        let mut sum: f64 = padded[..kw].iter().sum();
        out[0] = sum;
        for (x, o) in out.iter_mut().enumerate().skip(1) {
            sum += padded[x + kw - 1] - padded[x - 1];
            *o = sum;
        }
    }
    // Column sums carried down the image, one row at a time (OpenCV's `ColumnSum`).
    let ys: Vec<usize> = window_indices(h, kh);
    let area = kw * kh;
    let mut column = vec![0f64; w];
    for &i in &ys[..kh] {
        column.iter_mut().zip(&rows[i * w..(i + 1) * w]).for_each(|(c, r)| *c += r);
    }
    let mut dst = vec![T::DEFAULT_MIN_VALUE; w * h];
    for y in 0..h {
        dst[y * w..(y + 1) * w].iter_mut().zip(&column).for_each(|(d, &c)| *d = T::from_sum(c, area));
        if y + 1 < h {
            let (add, sub) = (ys[y + kh] * w, ys[y] * w);
            for (x, c) in column.iter_mut().enumerate() {
                *c += rows[add + x] - rows[sub + x];
            }
        }
    }
    Ok(Plane::from_raw(w as u32, h as u32, dst).expect("buffer sized to the image"))
}

/// Source index of each position `-(k/2) ..= len - 1 + k - 1 - k/2` under `BORDER_REFLECT_101`.
fn window_indices(len: usize, k: usize) -> Vec<usize> {
    let before = (k / 2) as i64;
    (0..(len + k - 1) as i64).map(|p| reflect_101(p - before, len as i64)).collect()
}

/// OpenCV's `borderInterpolate(p, len, BORDER_REFLECT_101)`, repeating the reflection for windows
/// wider than the image.
fn reflect_101(mut p: i64, len: i64) -> usize {
    if len == 1 {
        return 0;
    }
    while p < 0 || p >= len {
        p = if p < 0 { -p } else { 2 * (len - 1) - p };
    }
    p as usize
}
