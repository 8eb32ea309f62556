//! The WebUI's latent inpainting mask (A1111 `StableDiffusionProcessingImg2Img.init`): the blurred
//! mask resized to the latent grid with Pillow's `Image.resize` default filter (BICUBIC, which
//! widens its support when it shrinks), channel 0 divided by 255 and rounded (`np.around`), so a
//! latent pixel is repainted where the resized mask is at least 128. The sampler keeps the
//! original latents where it is 0 and its own where it is 1, at every step and after the last.

use candle_core::{Device, Tensor};
use easyphoto_face::resample::{PilFilter, resize_pil_u8};
use image::GrayImage;

use crate::error::{PipelineError, Result};

/// The blurred mask resized to `1/factor` of its size as the WebUI does, before rounding (8-bit).
pub fn resized_mask(blurred: &GrayImage, factor: u32) -> Result<GrayImage> {
    let (w, h) = blurred.dimensions();
    if factor == 0 || w % factor != 0 || h % factor != 0 || w == 0 || h == 0 {
        return Err(PipelineError::InvalidParameter {
            field: "mask".into(),
            reason: format!("a {w}×{h} mask has no {}× smaller latent grid", factor),
        });
    }
    let (lw, lh) = (w / factor, h / factor);
    let data =
        resize_pil_u8(blurred.as_raw(), (w as usize, h as usize), 1, (lw as usize, lh as usize), PilFilter::Bicubic);
    Ok(GrayImage::from_raw(lw, lh, data).expect("resize returns lw * lh values"))
}

/// The latent mask `[1, 1, h/factor, w/factor]` of a blurred mask: 1 = repaint, 0 = keep.
pub fn latent_mask(blurred: &GrayImage, factor: u32, device: &Device) -> Result<Tensor> {
    let resized = resized_mask(blurred, factor)?;
    let (w, h) = resized.dimensions();
    let data: Vec<f32> = resized.iter().map(|&v| if v >= 128 { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(data, (1, 1, h as usize, w as usize), device)
        .map_err(|source| PipelineError::Tensor { stage: "latent mask".into(), source: Box::new(source) })
}
