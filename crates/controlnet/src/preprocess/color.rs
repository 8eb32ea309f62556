//! EasyPhoto's colour map for the `control_sd15_random_color` unit (`get_controlnet_unit("color")`).
//!
//! The image is resized so its short side is 1024 with both sides rounded to multiples of 64
//! (Lanczos-4 when growing, area when shrinking), shrunk by `blur_ratio` (bicubic), grown back
//! (nearest, giving a mosaic), and resized to the input size (bicubic). EasyPhoto's `blur_ratio` is 1
//! (the image itself, resampled) since its PR #260, and 24 in the diffusers port.

use image::RgbImage;

use super::{Interpolation, PreprocessError, resize, resize_short_side};

/// EasyPhoto's colour control image of `image` with `blur_ratio` (1 at EasyPhoto's HEAD, 24 before).
pub fn color_map(image: &RgbImage, blur_ratio: f64) -> Result<RgbImage, PreprocessError> {
    if !(blur_ratio.is_finite() && blur_ratio > 0.0) {
        return Err(PreprocessError::InvalidParameter {
            name: "blur_ratio",
            reason: format!("must be a positive number, got {blur_ratio}"),
        });
    }
    let (w, h) = image.dimensions();
    let base = resize_short_side(image, 1024)?;
    let (short_w, short_h) = base.dimensions();
    let small_w = (f64::from(short_w) / blur_ratio).floor() as u32;
    let small_h = (f64::from(short_h) / blur_ratio).floor() as u32;
    let small = resize(&base, small_w, small_h, Interpolation::Cubic)?;
    let mosaic = resize(&small, short_w, short_h, Interpolation::Nearest)?;
    resize(&mosaic, w, h, Interpolation::Cubic)
}
