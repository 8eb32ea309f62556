//! The annotator's body estimation (controlnet_aux `Body.__call__`): the image scaled to a height of
//! 184 (`0.5 × 368`), padded to multiples of 8 with grey 128, run through [`BodyPoseModel`] as BGR
//! `x / 256 − 0.5`; the maps upsampled ×8 (Lanczos-4), cropped, resized to the image (area or
//! Lanczos-4, OpenCV's float path), then [`decode`](fn@super::decode::decode)d.

use candle_core::{Device, Tensor};
use image::RgbImage;

use super::{BodyPoseModel, Decoded, PoseMaps, decode, draw_bodypose};
use crate::preprocess::{Interpolation, PreprocessError, resize, resize_map, resize_short_side};

/// Height of the network input for an image (controlnet_aux: `boxsize 368 × scale_search 0.5`).
const BOX_HEIGHT: f64 = 0.5 * 368.0;
/// The network's output stride.
const STRIDE: usize = 8;
/// Grey of the padding.
const PAD_VALUE: f32 = 128.0;

/// controlnet_aux `smart_resize_k` / `smart_resize`: area when the size shrinks (by the sum of the
/// sides), Lanczos-4 otherwise.
fn smart_interpolation(from: (usize, usize), to: (usize, usize)) -> Interpolation {
    if ((to.0 + to.1) as f64) < (from.0 + from.1) as f64 { Interpolation::Area } else { Interpolation::Lanczos4 }
}

/// The network's maps resized to the image, as `[H, W, C]` f64 (what `decode` takes).
fn upsample(
    maps: &Tensor,
    crop: (usize, usize),
    image: (usize, usize),
    channels: usize,
) -> Result<Vec<f64>, PreprocessError> {
    let maps = maps.squeeze(0)?.to_dtype(candle_core::DType::F32)?;
    let (_, mh, mw) = maps.dims3()?;
    let (uw, uh) = (mw * STRIDE, mh * STRIDE);
    let mut out = vec![0f64; image.0 * image.1 * channels];
    for c in 0..channels {
        let plane = maps.get(c)?.flatten_all()?.to_vec1::<f32>()?;
        let up = resize_map(&plane, mw, mh, uw, uh, Interpolation::Lanczos4)?;
        let cropped: Vec<f32> = (0..crop.1).flat_map(|y| up[y * uw..y * uw + crop.0].iter().copied()).collect();
        let interpolation = smart_interpolation(crop, image);
        let full = resize_map(&cropped, crop.0, crop.1, image.0, image.1, interpolation)?;
        for (i, v) in full.into_iter().enumerate() {
            out[i * channels + c] = f64::from(v);
        }
    }
    Ok(out)
}

/// Heat maps (`[H, W, 19]`) and part affinity fields (`[H, W, 38]`) of `image` at its own size.
pub fn pose_maps(
    model: &BodyPoseModel,
    image: &RgbImage,
    device: &Device,
) -> Result<(Vec<f64>, Vec<f64>), PreprocessError> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    if w == 0 || h == 0 {
        return Err(PreprocessError::EmptySize { from: (0, 0), to: (0, 0) });
    }
    let scale = BOX_HEIGHT / h as f64;
    let (sw, sh) = ((w as f64 * scale) as usize, (h as f64 * scale) as usize);
    if sw == 0 || sh == 0 {
        return Err(PreprocessError::InvalidParameter {
            name: "image",
            reason: format!("{w}x{h} is too wide to scale to a height of {BOX_HEIGHT}"),
        });
    }
    let scaled = resize(image, sw as u32, sh as u32, smart_interpolation((w, h), (sw, sh)))?;
    let (pw, ph) = (sw.div_ceil(STRIDE) * STRIDE, sh.div_ceil(STRIDE) * STRIDE);
    // BGR planes, x / 256 - 0.5, padded with grey at the right and bottom.
    let mut input = vec![PAD_VALUE / 256.0 - 0.5; 3 * ph * pw];
    for (x, y, p) in scaled.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        for (plane, channel) in [2, 1, 0].into_iter().enumerate() {
            input[(plane * ph + y) * pw + x] = f32::from(p.0[channel]) / 256.0 - 0.5;
        }
    }
    let input = Tensor::from_vec(input, (1, 3, ph, pw), device)?;
    let (paf, heat) = model.forward(&input)?;
    let heatmaps = upsample(&heat, (sw, sh), (w, h), 19)?;
    let pafs = upsample(&paf, (sw, sh), (w, h), 38)?;
    Ok((heatmaps, pafs))
}

/// The people in `image`: controlnet_aux `Body(image)`'s candidate and subset tables, in the image's
/// pixel coordinates (see [`Decoded::bodies`] for normalised keypoints).
pub fn estimate_bodies(model: &BodyPoseModel, image: &RgbImage, device: &Device) -> Result<Decoded, PreprocessError> {
    let (heatmaps, pafs) = pose_maps(model, image, device)?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    decode(&PoseMaps { width, height, heatmaps: &heatmaps, pafs: &pafs })
}

/// controlnet_aux `OpenposeDetector(image)` with the body only: the image resized to
/// `detect_resolution` on its short side (see [`resize_short_side`]), its people estimated and drawn
/// with [`draw_bodypose`] on black at that size.
pub fn annotate_openpose(
    model: &BodyPoseModel,
    image: &RgbImage,
    detect_resolution: u32,
    device: &Device,
) -> Result<RgbImage, PreprocessError> {
    let resized = resize_short_side(image, detect_resolution)?;
    let (w, h) = resized.dimensions();
    let mut canvas = RgbImage::new(w, h);
    for body in estimate_bodies(model, &resized, device)?.bodies(w as usize, h as usize) {
        draw_bodypose(&mut canvas, &body);
    }
    Ok(canvas)
}
