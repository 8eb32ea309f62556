//! Face alignment: the least-squares similarity transform between landmark sets (Umeyama, as
//! scikit-image's `SimilarityTransform.estimate`), insightface's ArcFace template and `norm_crop`,
//! and [`warp_affine`], OpenCV's `cv2.warpAffine` with `INTER_LINEAR` and a constant black border.

use image::{ImageBuffer, Pixel, RgbImage};

use crate::FaceError;

/// insightface's ArcFace destination landmarks for a 112×112 crop (left eye, right eye, nose tip,
/// left and right mouth corners; "left" is the left of the image).
pub const ARCFACE_TEMPLATE: [[f32; 2]; 5] =
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]];

/// A 2×3 affine matrix `[[a, b, c], [d, e, f]]` mapping `(x, y)` to `(a x + b y + c, d x + e y + f)`,
/// the layout `cv2.warpAffine` takes.
pub type Affine = [[f64; 3]; 2];

/// A similarity transform: rotation, uniform scale and translation,
/// `x' = a x - b y + tx`, `y' = b x + a y + ty` (no reflection).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    /// `scale · cos(angle)`.
    pub a: f64,
    /// `scale · sin(angle)`.
    pub b: f64,
    /// Translation along x.
    pub tx: f64,
    /// Translation along y.
    pub ty: f64,
}

impl Similarity {
    /// The least-squares similarity taking `src` onto `dst` (Umeyama 1991 with scale estimation, the
    /// transform of `skimage.transform.SimilarityTransform.estimate` and insightface's
    /// `estimate_norm`).
    ///
    /// In 2-D the optimal rotation has a closed form, `atan2(Σ dy·sx − dx·sy, Σ dx·sx + dy·sy)` on the
    /// centred points, and equals scikit-image's SVD solution (including its reflection handling:
    /// like Umeyama it never returns a reflection). Errors when the point counts differ, when there
    /// are fewer than two points, or when `src` or `dst` collapses to a single point.
    pub fn estimate(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<Self, FaceError> {
        if src.len() != dst.len() || src.len() < 2 {
            return Err(FaceError::DegenerateLandmarks {
                reason: format!(
                    "{} source and {} destination points (need equal counts, at least 2)",
                    src.len(),
                    dst.len()
                ),
            });
        }
        let n = src.len() as f64;
        let mean = |pts: &[[f32; 2]]| {
            let (sx, sy) = pts.iter().fold((0.0, 0.0), |(x, y), p| (x + f64::from(p[0]), y + f64::from(p[1])));
            (sx / n, sy / n)
        };
        let (smx, smy) = mean(src);
        let (dmx, dmy) = mean(dst);
        let (mut dot, mut cross, mut src_var, mut dst_var) = (0.0, 0.0, 0.0, 0.0);
        for (s, d) in src.iter().zip(dst) {
            let (sx, sy) = (f64::from(s[0]) - smx, f64::from(s[1]) - smy);
            let (dx, dy) = (f64::from(d[0]) - dmx, f64::from(d[1]) - dmy);
            dot += dx * sx + dy * sy;
            cross += dy * sx - dx * sy;
            src_var += sx * sx + sy * sy;
            dst_var += dx * dx + dy * dy;
        }
        if src_var <= f64::EPSILON * (smx * smx + smy * smy).max(1.0) || dst_var == 0.0 {
            return Err(FaceError::DegenerateLandmarks { reason: "all points coincide".to_string() });
        }
        let (a, b) = (dot / src_var, cross / src_var);
        Ok(Self { a, b, tx: dmx - (a * smx - b * smy), ty: dmy - (b * smx + a * smy) })
    }

    /// The 2×3 matrix (`tform.params[:2]` in scikit-image).
    pub fn matrix(&self) -> Affine {
        [[self.a, -self.b, self.tx], [self.b, self.a, self.ty]]
    }

    /// The uniform scale factor.
    pub fn scale(&self) -> f64 {
        self.a.hypot(self.b)
    }

    /// The rotation angle in radians (counter-clockwise in a y-up frame, clockwise on screen).
    pub fn rotation(&self) -> f64 {
        self.b.atan2(self.a)
    }

    /// Maps a point.
    pub fn apply(&self, [x, y]: [f32; 2]) -> [f32; 2] {
        let (x, y) = (f64::from(x), f64::from(y));
        [(self.a * x - self.b * y + self.tx) as f32, (self.b * x + self.a * y + self.ty) as f32]
    }
}

/// insightface's `estimate_norm`: the similarity taking five landmarks onto [`ARCFACE_TEMPLATE`]
/// scaled to a `size`×`size` crop (`size` a multiple of 112; for a multiple of 128 the template is
/// scaled by `size/128` and shifted right by `8·size/128`, as insightface does).
pub fn estimate_norm(landmarks: &[[f32; 2]; 5], size: u32) -> Result<Similarity, FaceError> {
    let (ratio, shift) = if size.is_multiple_of(112) {
        (size as f32 / 112.0, 0.0)
    } else if size.is_multiple_of(128) {
        let ratio = size as f32 / 128.0;
        (ratio, 8.0 * ratio)
    } else {
        return Err(FaceError::DegenerateLandmarks {
            reason: format!("crop size {size} is neither a multiple of 112 nor of 128"),
        });
    };
    let dst = ARCFACE_TEMPLATE.map(|[x, y]| [x * ratio + shift, y * ratio]);
    Similarity::estimate(landmarks, &dst)
}

/// insightface's `norm_crop`: the `size`×`size` ArcFace-aligned crop of the face with these five
/// landmarks (`cv2.warpAffine(img, estimate_norm(lmk, size), (size, size), borderValue=0)`).
pub fn norm_crop(img: &RgbImage, landmarks: &[[f32; 2]; 5], size: u32) -> Result<RgbImage, FaceError> {
    let transform = estimate_norm(landmarks, size)?;
    Ok(warp_affine(img, &transform.matrix(), size, size))
}

/// `cv2.invertAffineTransform`, in the same floating-point order; a singular matrix gives zeros.
pub fn invert_affine(m: &Affine) -> Affine {
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    let det = if det != 0.0 { 1.0 / det } else { 0.0 };
    let (a11, a22) = (m[1][1] * det, m[0][0] * det);
    let (a12, a21) = (-m[0][1] * det, -m[1][0] * det);
    let b1 = -a11 * m[0][2] - a12 * m[1][2];
    let b2 = -a21 * m[0][2] - a22 * m[1][2];
    [[a11, a12, b1], [a21, a22, b2]]
}

/// `cv2.warpAffine(img, m, (width, height))` with its defaults: `m` maps source to destination
/// pixels, bilinear interpolation, pixels outside the source read as 0.
///
/// Follows OpenCV 4.11+/5's floating-point kernels: the inverse matrix ([`invert_affine`]) in
/// f64, each row's offset rounded to f32, source positions `fma(m00, x, row offset)` in f32,
/// bilinear blending as two f32 `fma` lerps (horizontal, then vertical) and rounding half to even.
/// Any 8-bit pixel type works (RGB, luma masks, ...). A destination pixel whose 2×2 neighbourhood
/// lies wholly outside the source is 0; one that straddles the edge blends with 0.
pub fn warp_affine<P>(img: &ImageBuffer<P, Vec<u8>>, m: &Affine, width: u32, height: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8>,
{
    let inv = invert_affine(m);
    let channels = usize::from(P::CHANNEL_COUNT);
    let kernel = Warp {
        src: img.as_raw(),
        src_w: i64::from(img.width()),
        src_h: i64::from(img.height()),
        channels,
        m00: inv[0][0] as f32,
        m10: inv[1][0] as f32,
        inv,
    };
    let row_len = width as usize * channels;
    let mut out = vec![0u8; row_len * height as usize];
    let fill_row = |y: usize, row: &mut [u8]| kernel.row(y, row);
    if row_len > 0 && out.len() >= PARALLEL_MIN {
        use rayon::prelude::*;
        out.par_chunks_exact_mut(row_len).enumerate().for_each(|(y, row)| fill_row(y, row));
    } else if row_len > 0 {
        out.chunks_exact_mut(row_len).enumerate().for_each(|(y, row)| fill_row(y, row));
    }
    ImageBuffer::from_raw(width, height, out).expect("buffer sized width × height × channels")
}

/// The per-row state of [`warp_affine`].
struct Warp<'a> {
    src: &'a [u8],
    src_w: i64,
    src_h: i64,
    channels: usize,
    /// The inverse (destination → source) matrix.
    inv: Affine,
    m00: f32,
    m10: f32,
}

impl Warp<'_> {
    /// Fills destination row `y`: eight pixels at a time with AVX2 where the CPU has it, otherwise
    /// one at a time (with hardware fused multiply-adds where available). All paths give the same
    /// bytes.
    fn row(&self, y: usize, row: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, the features `row_avx2` enables.
            return unsafe { self.row_avx2(y, row) };
        }
        self.row_channels(y, row, |a, x, c| (f64::from(a) * f64::from(x) + f64::from(c)) as f32);
    }

    /// The f32 source position of destination pixel `(0, y)`, from the f64 inverse matrix.
    fn row_origin(&self, y: usize) -> (f32, f32) {
        let (y, inv) = (y as f64, &self.inv);
        ((y * inv[0][1] + inv[0][2]) as f32, (y * inv[1][1] + inv[1][2]) as f32)
    }

    /// Dispatches to a kernel specialised for the channel count.
    #[inline(always)]
    fn row_channels(&self, y: usize, row: &mut [u8], fma: impl Fn(f32, f32, f32) -> f32 + Copy) {
        match self.channels {
            1 => self.row_with::<1>(y, row, fma),
            3 => self.row_with::<3>(y, row, fma),
            4 => self.row_with::<4>(y, row, fma),
            _ => self.row_with::<0>(y, row, fma),
        }
    }

    /// The scalar row kernel for `C` channels (0: any, read from `self`).
    #[inline(always)]
    fn row_with<const C: usize>(&self, y: usize, row: &mut [u8], fma: impl Fn(f32, f32, f32) -> f32 + Copy) {
        let origin = self.row_origin(y);
        let channels = if C == 0 { self.channels } else { C };
        for (x, px) in row.chunks_exact_mut(channels).enumerate() {
            self.pixel::<C>(x, origin, px, fma);
        }
    }

    /// Destination pixel `x` of the row starting at source position `(row_x, row_y)`; `fma(a, x, c)`
    /// is `a·x + c` rounded once (the f64 product of two f32 is exact, so the portable version
    /// rounds once too, barring double rounding).
    #[inline(always)]
    fn pixel<const C: usize>(
        &self,
        x: usize,
        (row_x, row_y): (f32, f32),
        px: &mut [u8],
        fma: impl Fn(f32, f32, f32) -> f32 + Copy,
    ) {
        let (src, src_w, src_h) = (self.src, self.src_w, self.src_h);
        let channels = if C == 0 { self.channels } else { C };
        let stride = src_w as usize * channels;
        let lerp = |t: f32, a: f32, b: f32| fma(t, b - a, a);
        let sample = |x: i64, y: i64, c: usize| -> f32 {
            if x >= 0 && y >= 0 && x < src_w && y < src_h {
                f32::from(src[y as usize * stride + x as usize * channels + c])
            } else {
                0.0
            }
        };
        let (sx, sy) = (fma(self.m00, x as f32, row_x), fma(self.m10, x as f32, row_y));
        let (fx, fy) = (floor(sx), floor(sy));
        let (ix, iy) = (fx as i64, fy as i64);
        if ix >= src_w || ix + 1 < 0 || iy >= src_h || iy + 1 < 0 {
            px.fill(0); // wholly outside: the border value 0
            return;
        }
        let (ax, ay) = (sx - fx, sy - fy);
        if ix >= 0 && iy >= 0 && ix + 1 < src_w && iy + 1 < src_h {
            // Fast path: the whole 2×2 neighbourhood is inside.
            let base = iy as usize * stride + ix as usize * channels;
            let (top, bottom) = (&src[base..base + 2 * channels], &src[base + stride..base + stride + 2 * channels]);
            for (c, value) in px.iter_mut().enumerate() {
                let t = lerp(ax, f32::from(top[c]), f32::from(top[channels + c]));
                let b = lerp(ax, f32::from(bottom[c]), f32::from(bottom[channels + c]));
                *value = to_u8(lerp(ay, t, b));
            }
            return;
        }
        for (c, value) in px.iter_mut().enumerate() {
            let top = lerp(ax, sample(ix, iy, c), sample(ix + 1, iy, c));
            let bottom = lerp(ax, sample(ix, iy + 1, c), sample(ix + 1, iy + 1, c));
            *value = to_u8(lerp(ay, top, bottom));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn row_avx2(&self, y: usize, row: &mut [u8]) {
        match self.channels {
            1 => self.row_avx2_with::<1>(y, row),
            3 => self.row_avx2_with::<3>(y, row),
            4 => self.row_avx2_with::<4>(y, row),
            _ => self.row_with::<0>(y, row, f32::mul_add),
        }
    }

    /// The AVX2 row kernel: the scalar kernel's operations on eight pixels at once (same rounding,
    /// so the same bytes). A group of eight whose 2×2 neighbourhoods are not all inside the source
    /// (with room for the 4-byte gathers) goes through the scalar kernel.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn row_avx2_with<const C: usize>(&self, y: usize, row: &mut [u8]) {
        use std::arch::x86_64::*;

        let origin = self.row_origin(y);
        let width = row.len() / C;
        // Gather offsets are i32 and bounds are compared in f32 (exact below 2^24): larger images
        // take the scalar kernel.
        let small = self.src.len() < (i32::MAX as usize) / 2 && self.src_w < 1 << 24 && self.src_h < 1 << 24;
        let groups = if small { width / 8 } else { 0 };
        let (w, h) = (self.src_w as f32, self.src_h as f32);
        let splat = _mm256_set1_ps;
        let (m00, m10, ox, oy) = (splat(self.m00), splat(self.m10), splat(origin.0), splat(origin.1));
        let lanes = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
        let (zero, max) = (_mm256_setzero_ps(), splat(255.0));
        let stride = _mm256_set1_epi32(self.src_w as i32 * C as i32);
        let (step, byte) = (_mm256_set1_epi32(C as i32), _mm256_set1_epi32(0xff));
        let src = self.src.as_ptr().cast::<i32>();
        for group in 0..groups {
            let x0 = group * 8;
            let xs = _mm256_add_ps(splat(x0 as f32), lanes);
            let (sx, sy) = (_mm256_fmadd_ps(m00, xs, ox), _mm256_fmadd_ps(m10, xs, oy));
            let (fx, fy) = (_mm256_floor_ps(sx), _mm256_floor_ps(sy));
            let inside = _mm256_and_ps(
                _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(fx, zero), _mm256_cmp_ps::<_CMP_LT_OQ>(fx, splat(w - 1.0))),
                _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(fy, zero), _mm256_cmp_ps::<_CMP_LT_OQ>(fy, splat(h - 1.0))),
            );
            // A 4-byte gather at the bottom-right neighbour reads up to 3 bytes past it: fine
            // unless that neighbour ends the image.
            let room = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_LT_OQ>(fy, splat(h - 2.0)),
                _mm256_cmp_ps::<_CMP_LT_OQ>(fx, splat(w - 3.0)),
            );
            if _mm256_movemask_ps(_mm256_and_ps(inside, room)) != 0xff {
                for (x, px) in row[x0 * C..(x0 + 8) * C].chunks_exact_mut(C).enumerate() {
                    self.pixel::<C>(x0 + x, origin, px, f32::mul_add);
                }
                continue;
            }
            let (ix, iy) = (_mm256_cvtps_epi32(fx), _mm256_cvtps_epi32(fy)); // exact: integral values
            let top = _mm256_add_epi32(_mm256_mullo_epi32(iy, stride), _mm256_mullo_epi32(ix, step));
            let bottom = _mm256_add_epi32(top, stride);
            // SAFETY: every lane is inside the image with 3 bytes to spare after its bottom-right
            // neighbour (checked above), and offsets fit in i32.
            let (g00, g10, g01, g11) = unsafe {
                let gather = |at: __m256i| _mm256_i32gather_epi32::<1>(src, at);
                let (g00, g10) = (gather(top), gather(bottom));
                if C == 1 {
                    (g00, g10, g00, g10)
                } else {
                    (g00, g10, gather(_mm256_add_epi32(top, step)), gather(_mm256_add_epi32(bottom, step)))
                }
            };
            let (ax, ay) = (_mm256_sub_ps(sx, fx), _mm256_sub_ps(sy, fy));
            let channel = |g: __m256i, shift: i32| {
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(g, _mm256_set1_epi32(shift)), byte))
            };
            let lerp = |t: __m256, a: __m256, b: __m256| _mm256_fmadd_ps(t, _mm256_sub_ps(b, a), a);
            let mut packed = _mm256_setzero_si256();
            for c in 0..C {
                let shift = 8 * c as i32;
                let right = if C == 1 { 8 } else { shift }; // one channel: the right neighbour is byte 1
                let t = lerp(ax, channel(g00, shift), channel(g01, right));
                let b = lerp(ax, channel(g10, shift), channel(g11, right));
                let v = _mm256_min_ps(_mm256_max_ps(lerp(ay, t, b), zero), max);
                // Rounds half to even (the default rounding mode), as `to_u8`.
                let v = _mm256_cvtps_epi32(v);
                packed = _mm256_or_si256(packed, _mm256_sllv_epi32(v, _mm256_set1_epi32(shift)));
            }
            let mut words = [0u32; 8];
            // SAFETY: `words` holds 32 bytes.
            unsafe { _mm256_storeu_si256(words.as_mut_ptr().cast(), packed) };
            for (px, word) in row[x0 * C..(x0 + 8) * C].chunks_exact_mut(C).zip(words) {
                px.copy_from_slice(&word.to_le_bytes()[..C]);
            }
        }
        for (x, px) in row.chunks_exact_mut(C).enumerate().skip(groups * 8) {
            self.pixel::<C>(x, origin, px, f32::mul_add);
        }
    }
}

/// Outputs smaller than this many values are warped on the calling thread (an ArcFace crop is
/// 37,632).
const PARALLEL_MIN: usize = 1 << 18;

/// `x.floor()` without a libm call (x86-64's baseline has no rounding instruction).
#[inline]
fn floor(x: f32) -> f32 {
    let t = x as i64 as f32; // truncated toward zero; |x| here is far below 2^63
    if t > x { t - 1.0 } else { t }
}

/// Rounds half to even and saturates to 0..=255, as `saturate_cast<uchar>(float)`: adding and
/// subtracting 2^23 rounds to an integer in the default rounding mode, with no libm call.
#[inline]
fn to_u8(v: f32) -> u8 {
    const MAGIC: f32 = 8_388_608.0;
    let v = v.clamp(0.0, 255.0);
    ((v + MAGIC) - MAGIC) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in [0, 1).
    fn lcg(state: &mut u64) -> f64 {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The AVX2 kernel gives the portable kernel's bytes, for 1, 3 and 4 channels, enlarging and
    /// reducing, rotated, across borders and at the image's last pixel.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_rows_equal_portable_rows() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            eprintln!("no AVX2/FMA on this CPU: nothing to compare");
            return;
        }
        let mut state = 7;
        for channels in [1usize, 3, 4] {
            let (src_w, src_h) = (37usize, 29usize);
            let src: Vec<u8> = (0..src_w * src_h * channels).map(|_| (lcg(&mut state) * 256.0) as u8).collect();
            for case in 0..200 {
                let angle = lcg(&mut state) * std::f64::consts::TAU;
                let scale = 0.3 + 3.0 * lcg(&mut state);
                let (a, b) = (scale * angle.cos(), scale * angle.sin());
                // Some cases land wholly inside, others straddle the borders.
                let spread = if case % 2 == 0 { 10.0 } else { 60.0 };
                let (tx, ty) = (spread * (lcg(&mut state) - 0.5), spread * (lcg(&mut state) - 0.5));
                let m: Affine = [[a, -b, tx], [b, a, ty]];
                let inv = invert_affine(&m);
                let kernel = Warp {
                    src: &src,
                    src_w: src_w as i64,
                    src_h: src_h as i64,
                    channels,
                    m00: inv[0][0] as f32,
                    m10: inv[1][0] as f32,
                    inv,
                };
                let width = 45;
                for y in 0..40 {
                    let mut portable = vec![7u8; width * channels];
                    let mut simd = vec![9u8; width * channels];
                    kernel
                        .row_channels(y, &mut portable, |a, x, c| (f64::from(a) * f64::from(x) + f64::from(c)) as f32);
                    // SAFETY: AVX2 and FMA checked above.
                    unsafe { kernel.row_avx2(y, &mut simd) };
                    assert_eq!(portable, simd, "{channels} channels, case {case}, row {y}");
                }
            }
        }
    }
}
