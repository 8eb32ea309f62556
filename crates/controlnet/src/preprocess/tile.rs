//! `tile_resample`, the WebUI's preprocessor of the tile unit.

use image::RgbImage;

use super::{Interpolation, PreprocessError, resize};

/// The WebUI's `tile_resample(image, thr_a = rate)`: below a rate of 1.1 the image itself, otherwise
/// the image shrunk to `int(side / rate)` with area interpolation. EasyPhoto uses rate 1.
pub fn tile_resample(image: &RgbImage, rate: f64) -> Result<RgbImage, PreprocessError> {
    if rate.is_nan() {
        return Err(PreprocessError::InvalidParameter { name: "rate", reason: "is NaN".into() });
    }
    if rate < 1.1 {
        return Ok(image.clone());
    }
    let (w, h) = image.dimensions();
    let side = |s: u32| (f64::from(s) / rate) as u32;
    resize(image, side(w), side(h), Interpolation::Area)
}
