//! Canny edges with OpenCV's semantics (`cv2.Canny(image, low, high)`: 3×3 Sobel, L1 gradient).
//!
//! - Sobel derivatives in 16-bit integers with replicated borders; on a colour image each pixel takes
//!   the derivatives of the channel with the largest `|dx| + |dy|` (the first one on ties).
//! - Non-maximum suppression along the gradient direction quantised with tan 22.5° in 15-bit fixed
//!   point, comparing `>` on one side and `>=` on the other as OpenCV does.
//! - Hysteresis: pixels above `high` seed edges that grow through 8-connected pixels above `low`.

use image::{GrayImage, ImageBuffer, Luma, Pixel, RgbImage};

use super::{Interpolation, PreprocessError, resize, resize_short_side};

/// controlnet_aux's `CannyDetector`: the image resized to `detect_resolution` on its short side (sides
/// at multiples of 64, see [`resize_short_side`]), then [`canny`] on its three colour channels (no
/// conversion to grey). EasyPhoto uses 100 / 200 at resolution 512.
pub fn annotate_canny(
    image: &RgbImage,
    low: f32,
    high: f32,
    detect_resolution: u32,
) -> Result<GrayImage, PreprocessError> {
    Ok(canny(&resize_short_side(image, detect_resolution)?, low, high))
}

/// sd-webui-controlnet's `canny` preprocessor (the one EasyPhoto's WebUI units run): the image resized
/// so its short side is `resolution` (bicubic when growing, area otherwise; sides rounded half to
/// even), padded at the right and bottom to multiples of 64 by repeating the edge, [`canny`] on the
/// three colour channels, and the padding cropped off. EasyPhoto: 100 / 200 at 512 (1024 for SDXL).
pub fn annotate_canny_webui(
    image: &RgbImage,
    low: f32,
    high: f32,
    resolution: u32,
) -> Result<GrayImage, PreprocessError> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(PreprocessError::EmptySize { from: (w, h), to: (resolution, resolution) });
    }
    let k = f64::from(resolution) / f64::from(w.min(h));
    let side = |s: u32| (f64::from(s) * k).round_ties_even() as u32;
    let (tw, th) = (side(w), side(h));
    let interpolation = if k > 1.0 { Interpolation::Cubic } else { Interpolation::Area };
    let resized = resize(image, tw, th, interpolation)?;
    let (pw, ph) = (tw.div_ceil(64) * 64, th.div_ceil(64) * 64);
    let padded = RgbImage::from_fn(pw, ph, |x, y| *resized.get_pixel(x.min(tw - 1), y.min(th - 1)));
    let edges = canny(&padded, low, high);
    Ok(image::imageops::crop_imm(&edges, 0, 0, tw, th).to_image())
}

/// `cv2.Canny(image, low, high)` (aperture 3, L1 gradient) on an 8-bit image of any channel count.
///
/// The thresholds are floored to integers and swapped if `low > high`, as OpenCV does. Returns 255 on
/// edges and 0 elsewhere.
pub fn canny<P>(image: &ImageBuffer<P, Vec<u8>>, low: f32, high: f32) -> GrayImage
where
    P: Pixel<Subpixel = u8>,
{
    let (width, height) = image.dimensions();
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 {
        return GrayImage::new(width, height);
    }
    let (mut low, mut high) = (low.floor() as i32, high.floor() as i32);
    if low > high {
        std::mem::swap(&mut low, &mut high);
    }
    let gradient = sobel(image.as_raw(), w, h, usize::from(P::CHANNEL_COUNT));
    let mut map = suppress_non_maxima(&gradient, low, high);
    hysteresis(&mut map, w + 2);
    let mut pixels = vec![0u8; w * h];
    for (y, out) in pixels.chunks_exact_mut(w).enumerate() {
        let states = &map.states[(y + 1) * (w + 2) + 1..][..w];
        out.iter_mut().zip(states).for_each(|(o, &s)| *o = if s == EDGE { 255 } else { 0 });
    }
    ImageBuffer::<Luma<u8>, _>::from_raw(width, height, pixels).expect("one byte per pixel")
}

/// Derivatives and L1 magnitudes; `magnitude` has a one-pixel border of zeros.
struct Gradient {
    dx: Vec<i16>,
    dy: Vec<i16>,
    magnitude: Vec<i32>,
    width: usize,
    height: usize,
}

fn sobel(data: &[u8], w: usize, h: usize, cn: usize) -> Gradient {
    let stride = w * cn;
    let padded = (w + 2) * cn;
    let mut dx = vec![0i16; w * h];
    let mut dy = vec![0i16; w * h];
    let mut magnitude = vec![0i32; (w + 2) * (h + 2)];
    // Column sums [1 2 1]ᵀ and differences [-1 0 1]ᵀ of the three rows, with one replicated pixel
    // on each side.
    let mut smooth = vec![0i16; padded];
    let mut diff = vec![0i16; padded];
    let mut cdx = vec![0i16; stride];
    let mut cdy = vec![0i16; stride];
    for y in 0..h {
        let above = &data[y.saturating_sub(1) * stride..][..stride];
        let row = &data[y * stride..][..stride];
        let below = &data[(y + 1).min(h - 1) * stride..][..stride];
        for i in 0..stride {
            let (a, r, b) = (i16::from(above[i]), i16::from(row[i]), i16::from(below[i]));
            smooth[cn + i] = a + 2 * r + b;
            diff[cn + i] = b - a;
        }
        for c in 0..cn {
            smooth[c] = smooth[cn + c];
            diff[c] = diff[cn + c];
            smooth[cn + stride + c] = smooth[stride + c];
            diff[cn + stride + c] = diff[stride + c];
        }
        for i in 0..stride {
            cdx[i] = smooth[i + 2 * cn] - smooth[i];
            cdy[i] = diff[i] + 2 * diff[i + cn] + diff[i + 2 * cn];
        }
        let mag_row = &mut magnitude[(y + 1) * (w + 2) + 1..][..w];
        let (dx_row, dy_row) = (&mut dx[y * w..(y + 1) * w], &mut dy[y * w..(y + 1) * w]);
        if cn == 1 {
            for x in 0..w {
                dx_row[x] = cdx[x];
                dy_row[x] = cdy[x];
                mag_row[x] = i32::from(cdx[x].abs()) + i32::from(cdy[x].abs());
            }
        } else {
            for x in 0..w {
                let mut best = x * cn;
                let mut best_mag = i32::from(cdx[best].abs()) + i32::from(cdy[best].abs());
                for i in x * cn + 1..(x + 1) * cn {
                    let m = i32::from(cdx[i].abs()) + i32::from(cdy[i].abs());
                    if m > best_mag {
                        (best, best_mag) = (i, m);
                    }
                }
                dx_row[x] = cdx[best];
                dy_row[x] = cdy[best];
                mag_row[x] = best_mag;
            }
        }
    }
    Gradient { dx, dy, magnitude, width: w, height: h }
}

/// A pixel that may join an edge through hysteresis.
const CANDIDATE: u8 = 0;
/// Not an edge (also the map's border).
const NOT_EDGE: u8 = 1;
/// An edge.
const EDGE: u8 = 2;

/// Edge states with a one-pixel border, and the edges found so far (indices into `states`).
struct EdgeMap {
    states: Vec<u8>,
    stack: Vec<usize>,
}

fn suppress_non_maxima(g: &Gradient, low: i32, high: i32) -> EdgeMap {
    const SHIFT: u32 = 15;
    // tan(22.5°) in fixed point, rounded as OpenCV rounds it.
    const TG22: i32 = 13573;
    let (w, h) = (g.width, g.height);
    let stride = w + 2;
    let mut states = vec![NOT_EDGE; stride * (h + 2)];
    let mut stack = Vec::new();
    let mag = &g.magnitude;
    let stride_i = stride as isize;
    // Per direction (horizontal, vertical, anti-diagonal, diagonal): offsets of the neighbour that
    // must be strictly smaller and of the other one, and 1 where the other may be equal (OpenCV's >=).
    let neighbours: [(isize, isize, i32); 4] =
        [(-1, 1, 1), (-stride_i, stride_i, 1), (1 - stride_i, stride_i - 1, 0), (-1 - stride_i, stride_i + 1, 0)];
    for y in 0..h {
        let (dx_row, dy_row) = (&g.dx[y * w..][..w], &g.dy[y * w..][..w]);
        let start = (y + 1) * stride + 1;
        for x in 0..w {
            let i = start + x;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xs, ys) = (i32::from(dx_row[x]), i32::from(dy_row[x]));
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * TG22;
            let diagonal = 2 + usize::from((xs ^ ys) >= 0);
            let direction = if ay < tg22x {
                0
            } else if ay > tg22x + (ax << (SHIFT + 1)) {
                1
            } else {
                diagonal
            };
            let (before, after, equal_ok) = neighbours[direction];
            let is_max =
                (m > mag[(i as isize + before) as usize]) & (m + equal_ok > mag[(i as isize + after) as usize]);
            if is_max {
                if m > high {
                    states[i] = EDGE;
                    stack.push(i);
                } else {
                    states[i] = CANDIDATE;
                }
            }
        }
    }
    EdgeMap { states, stack }
}

fn hysteresis(map: &mut EdgeMap, stride: usize) {
    let offsets = [1, stride - 1, stride, stride + 1];
    while let Some(i) = map.stack.pop() {
        for &o in &offsets {
            for j in [i - o, i + o] {
                if map.states[j] == CANDIDATE {
                    map.states[j] = EDGE;
                    map.stack.push(j);
                }
            }
        }
    }
}
