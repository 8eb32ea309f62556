//! The WebUI's last step of inpainting in "whole picture" mode (what EasyPhoto's diffusion passes
//! use, `mask_blur = 8`): the mask is blurred (`cv2.GaussianBlur` along x, then along y, kernel
//! `2·⌊2.5·blur + 0.5⌋ + 1`), doubled and clipped (`mask_for_overlay`), and the original image is
//! laid back over the generated one wherever that mask is below 255. The sampling loop itself
//! (`sampling::Inpaint`) only repaints latents; this restores the untouched pixels exactly.

use image::{GrayImage, RgbImage};

use crate::error::{DiffusionError, Result};

/// `cv2.GaussianBlur(mask, (k, 1), blur)` then `(1, k)`, as the WebUI applies `mask_blur`
/// (each pass rounded to 8 bits; borders reflected without repeating the edge, OpenCV's default).
pub fn blur_mask(mask: &GrayImage, blur: f64) -> GrayImage {
    if blur <= 0.0 {
        return mask.clone();
    }
    let kernel = gaussian_kernel(2 * (2.5 * blur + 0.5) as usize + 1, blur);
    let horizontal = convolve_axis(mask, &kernel, true);
    convolve_axis(&horizontal, &kernel, false)
}

/// The WebUI's `mask_for_overlay`: the blurred mask doubled and clipped to 255.
pub fn overlay_mask(mask: &GrayImage, blur: f64) -> GrayImage {
    let mut out = blur_mask(mask, blur);
    out.iter_mut().for_each(|v| *v = v.saturating_mul(2));
    out
}

/// Lays `original` back over `generated` with opacity `255 − overlay`, with the WebUI's exact
/// 8-bit arithmetic (PIL: the original pasted through the mask into a premultiplied `RGBa` image,
/// converted back to `RGBA`, then `alpha_composite`d over the generation). Pixels where the
/// overlay mask is 0 come back unchanged, pixels where it is 255 keep the generation.
pub fn apply_overlay(generated: &RgbImage, original: &RgbImage, overlay: &GrayImage) -> Result<RgbImage> {
    for (name, size) in [("original", original.dimensions()), ("overlay mask", overlay.dimensions())] {
        if size != generated.dimensions() {
            return Err(DiffusionError::input(
                "inpaint overlay",
                format!(
                    "the {name} is {}×{}, the generated image {}×{}",
                    size.0,
                    size.1,
                    generated.width(),
                    generated.height()
                ),
            ));
        }
    }
    // PIL's rounded division by 255 (`DIV255`) and its cheaper variant (`SHIFTFORDIV255`).
    let div255 = |a: u32| ((a + 128) + ((a + 128) >> 8)) >> 8;
    let shift_div255 = |a: u32| (a + (a >> 8)) >> 8;
    let mut out = generated.clone();
    for ((o, src), &m) in out.pixels_mut().zip(original.pixels()).zip(overlay.iter()) {
        let alpha = 255 - u32::from(m);
        if alpha == 0 {
            continue;
        }
        for (c, s) in o.0.iter_mut().zip(src.0) {
            let premultiplied = div255(u32::from(s) * alpha);
            let straight = if alpha == 255 { premultiplied } else { (255 * premultiplied / alpha).min(255) };
            // alpha_composite over an opaque image, 7 extra bits of precision.
            let mixed = straight * alpha * 128 + u32::from(*c) * (255 - alpha) * 128;
            *c = (shift_div255(mixed + (0x80 << 7)) >> 7) as u8;
        }
    }
    Ok(out)
}

/// The whole composite: `mask` (255 = repainted) blurred by `mask_blur`, then the overlay.
pub fn composite_inpaint(
    generated: &RgbImage,
    original: &RgbImage,
    mask: &GrayImage,
    mask_blur: f64,
) -> Result<RgbImage> {
    apply_overlay(generated, original, &overlay_mask(mask, mask_blur))
}

/// OpenCV's 8-bit Gaussian kernel: the exact Gaussian (`getGaussianKernelBitExact`) in fixed point
/// with 8 fraction bits, rounding errors carried from the tails inward and the centre taking what
/// is left, so the weights sum to exactly 256.
fn gaussian_kernel(size: usize, sigma: f64) -> Vec<u32> {
    let half = size / 2;
    let scale = -0.125 / (sigma * sigma);
    let tails: Vec<f64> = (0..half)
        .map(|i| {
            let x = 2.0 * i as f64 + 1.0 - size as f64;
            (x * x * scale).exp()
        })
        .collect();
    let norm = 1.0 / (tails.iter().sum::<f64>() * 2.0 + 1.0);
    let mut kernel = vec![0u32; size];
    let (mut carried, mut sum) = (0.0, 0);
    for (i, t) in tails.iter().enumerate() {
        let value = t * norm * 256.0 + carried;
        let fixed = value.round_ties_even();
        carried = value - fixed;
        kernel[i] = fixed as u32;
        kernel[size - 1 - i] = fixed as u32;
        sum += 2 * fixed as u32;
    }
    kernel[half] = 256 - sum;
    kernel
}

/// OpenCV's default border, `BORDER_REFLECT_101` (`gfedcb|abcdefgh|gfedcba`).
fn reflect_101(i: isize, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let i = i.rem_euclid(period);
    (if i < len as isize { i } else { period - i }) as usize
}

fn convolve_axis(image: &GrayImage, kernel: &[u32], horizontal: bool) -> GrayImage {
    let (w, h) = image.dimensions();
    let radius = (kernel.len() / 2) as isize;
    GrayImage::from_fn(w, h, |x, y| {
        let sum: u32 = kernel
            .iter()
            .enumerate()
            .map(|(k, weight)| {
                let offset = k as isize - radius;
                let (sx, sy) = if horizontal {
                    (reflect_101(x as isize + offset, w as usize) as u32, y)
                } else {
                    (x, reflect_101(y as isize + offset, h as usize) as u32)
                };
                weight * u32::from(image.get_pixel(sx, sy).0[0])
            })
            .sum();
        image::Luma([((sum + 128) >> 8).min(255) as u8])
    })
}
