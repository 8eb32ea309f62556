//! Image loading and conversion to model input tensors.

use std::path::Path;

use image::RgbImage;
use image::imageops::{self, FilterType};
use ndarray::Array4;

use crate::FaceError;

/// Reads and decodes an image file (PNG or JPEG) as 8-bit RGB; alpha is dropped.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage, FaceError> {
    let path = path.as_ref();
    image::open(path)
        .map(|img| img.to_rgb8())
        .map_err(|source| FaceError::ImageDecode { path: path.to_path_buf(), source })
}

/// Resizes `img` to `width`×`height` (aspect ratio not kept) and returns a `[1, 3, height, width]`
/// RGB tensor scaled to [-1, 1] (`v / 127.5 - 1`), the input of MediaPipe's BlazeFace and FaceMesh.
///
/// The resize is `image::imageops::resize` with [`FilterType::Triangle`]: a linear filter whose
/// support widens by the reduction factor (so downscaling averages, like PIL's `BILINEAR`); vertical
/// pass first in f32, then the horizontal pass rounded to u8. `tools/reference/face_onnx_io.py`
/// reproduces it bit for bit.
pub fn to_nchw_signed(img: &RgbImage, width: u32, height: u32) -> Array4<f32> {
    let resized = imageops::resize(img, width, height, FilterType::Triangle);
    Array4::from_shape_fn((1, 3, height as usize, width as usize), |(_, c, y, x)| {
        f32::from(resized.get_pixel(x as u32, y as u32)[c]) / 127.5 - 1.0
    })
}
