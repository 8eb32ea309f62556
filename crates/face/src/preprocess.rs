//! Image input: decoding files and bytes to 8-bit RGB, and conversion to model input tensors.
//!
//! Decoding follows what EasyPhoto does with an upload, `ImageOps.exif_transpose(Image.open(f))
//! .convert("RGB")`: the EXIF orientation is applied, grey is replicated to three channels and
//! alpha is **dropped** (PIL's `convert("RGB")` keeps the colour under transparent pixels; it does
//! not composite onto a background). One deliberate difference: 16-bit samples are scaled to 8 bits
//! (`round(v·255/65535)`), where Pillow clips 16-bit grey at 255 and turns most of such an image white.
//!
//! The pixel count is read from the header and checked against [`DecodeLimits::max_pixels`] before
//! any pixel is decoded, so a small file that declares a huge image (a decompression bomb) is
//! refused cheaply.

use std::io::Cursor;
use std::path::Path;

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits, RgbImage};
use ndarray::Array4;

use crate::FaceError;

/// Bounds checked while decoding an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The largest accepted `width × height`, read from the header before decoding.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    /// 8192 × 8192 pixels (64 Mpx): any photo a phone or DSLR takes, and 192 MiB as RGB8.
    fn default() -> Self {
        Self { max_pixels: 8192 * 8192 }
    }
}

/// Reads and decodes an image file as 8-bit RGB with the default [`DecodeLimits`]; see the module
/// documentation for orientation, alpha, grey and 16-bit handling.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage, FaceError> {
    load_rgb_with(path, &DecodeLimits::default())
}

/// Reads and decodes an image file as 8-bit RGB within `limits`.
pub fn load_rgb_with(path: impl AsRef<Path>, limits: &DecodeLimits) -> Result<RgbImage, FaceError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| FaceError::ImageRead { path: path.to_path_buf(), source })?;
    decode_rgb(&bytes, path, limits)
}

/// Decodes an encoded image (PNG, JPEG, BMP or TIFF) held in memory as 8-bit RGB within `limits`; `name`
/// (a file name or any label) is what errors report.
pub fn decode_rgb(bytes: &[u8], name: impl AsRef<Path>, limits: &DecodeLimits) -> Result<RgbImage, FaceError> {
    let path = name.as_ref().to_path_buf();
    if bytes.is_empty() {
        return Err(FaceError::EmptyImage { path });
    }
    let decode_error = |source: ImageError| match source {
        ImageError::Unsupported(_) => FaceError::UnsupportedImage { path: path.clone() },
        source => FaceError::ImageDecode { path: path.clone(), source },
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| FaceError::ImageRead { path: path.clone(), source })?;
    if reader.format().is_none() {
        return Err(FaceError::UnsupportedImage { path });
    }
    let mut decoder_limits = Limits::default();
    // Room for the largest accepted image as 16-bit RGBA plus the decoder's working memory.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(decode_error)?;

    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(FaceError::EmptyImage { path });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(FaceError::ImageTooLarge { path, width, height, max_pixels: limits.max_pixels });
    }
    let orientation = decoder.orientation().map_err(decode_error)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    image.apply_orientation(orientation);
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
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
