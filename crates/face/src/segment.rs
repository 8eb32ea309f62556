//! Saliency / person segmentation: the [`Segmenter`] trait, U²-Net run as rembg runs it
//! (EasyPhoto's training-mask saliency; users supply `u2net.onnx`), and the tiny selfie model
//! embedded in the crate as the default.

use std::path::Path;

use image::{GrayImage, RgbImage};
use ndarray::Array4;

use crate::resample::{PilFilter, resize_linear_u8, resize_pil_u8};
use crate::{FaceError, Input, OnnxModel};

static SELFIE: &[u8] = include_bytes!("../assets/human/human_selfie.onnx");

/// A foreground segmenter: an alpha mask (0..255) the size of the image.
pub trait Segmenter {
    /// The mask of `img`.
    fn segment(&self, img: &RgbImage) -> Result<GrayImage, FaceError>;
}

/// U²-Net (input `[1, 3, 320, 320]`, the first output the saliency map), with rembg's pre- and
/// post-processing: Pillow LANCZOS to 320², divided by the image maximum, ImageNet mean/std; the
/// map min-max normalised, truncated to 8 bits, LANCZOS back to the image size.
#[derive(Debug)]
pub struct U2Net {
    model: OnnxModel,
    input: String,
    output: String,
}

const U2NET_SIZE: usize = 320;
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

impl U2Net {
    /// Loads a U²-Net ONNX file (`u2net.onnx`, `u2netp.onnx`, `u2net_human_seg.onnx`, ...).
    pub fn load(path: impl AsRef<Path>, threads: usize) -> Result<Self, FaceError> {
        let path = path.as_ref();
        let model = OnnxModel::load(path, threads)?;
        let unsupported = |reason: String| FaceError::UnsupportedModel { path: path.to_path_buf(), reason };
        let (input, shape) = model.inputs().first().cloned().ok_or_else(|| unsupported("no input".into()))?;
        if !matches!(shape.as_slice(), [_, 3, h, w] if (*h == 320 || *h < 0) && (*w == 320 || *w < 0)) {
            return Err(unsupported(format!("input shape {shape:?}, expected [1, 3, 320, 320]")));
        }
        let output = model.outputs().first().map(|(n, _)| n.clone()).ok_or_else(|| unsupported("no output".into()))?;
        Ok(Self { model, input, output })
    }
}

impl Segmenter for U2Net {
    fn segment(&self, img: &RgbImage) -> Result<GrayImage, FaceError> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Ok(GrayImage::new(img.width(), img.height()));
        }
        let s = U2NET_SIZE;
        let small = resize_pil_u8(img.as_raw(), (w, h), 3, (s, s), PilFilter::Lanczos);
        let max = f64::from(small.iter().copied().max().unwrap_or(0)).max(1e-6);
        let input = Array4::from_shape_fn((1, 3, s, s), |(_, c, y, x)| {
            ((f64::from(small[(y * s + x) * 3 + c]) / max - MEAN[c]) / STD[c]) as f32
        });
        let out = self.model.run(&[(self.input.as_str(), Input::from(&input))])?;
        let pred = &out[&self.output];
        let pred = pred.as_slice().filter(|p| p.len() >= s * s).ok_or_else(|| FaceError::BadShape {
            name: self.output.clone(),
            expected: vec![1, 1, s as i64, s as i64],
            found: pred.shape().to_vec(),
        })?;
        let pred = &pred[..s * s];
        let (lo, hi) = pred.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let range = hi - lo;
        let mask: Vec<u8> = pred
            .iter()
            .map(|&v| if range > 0.0 { (((v - lo) / range).clamp(0.0, 1.0) * 255.0) as u8 } else { 0 })
            .collect();
        let full = resize_pil_u8(&mask, (s, s), 1, (w, h), PilFilter::Lanczos);
        Ok(GrayImage::from_raw(img.width(), img.height(), full).expect("sized w × h"))
    }
}

/// MediaPipe's selfie segmentation (via the Human library), embedded: person probability on a
/// 256² RGB input in 0..1. The image is resized with `cv2.resize`-style bilinear, the
/// probability scaled to 0..255 (rounded) and resized back the same way.
#[derive(Debug)]
pub struct HumanSelfie {
    model: OnnxModel,
}

const SELFIE_SIZE: usize = 256;

impl HumanSelfie {
    /// The embedded model; `threads` ONNX Runtime intra-op threads (0: auto).
    pub fn new(threads: usize) -> Result<Self, FaceError> {
        Ok(Self { model: OnnxModel::from_memory(SELFIE, "human/human_selfie.onnx", threads)? })
    }
}

impl Segmenter for HumanSelfie {
    fn segment(&self, img: &RgbImage) -> Result<GrayImage, FaceError> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Ok(GrayImage::new(img.width(), img.height()));
        }
        let s = SELFIE_SIZE;
        let small = resize_linear_u8(img.as_raw(), (w, h), 3, (s, s));
        let input = Array4::from_shape_fn((1, s, s, 3), |(_, y, x, c)| f32::from(small[(y * s + x) * 3 + c]) / 255.0);
        let mut out = self.model.run(&[("input_1:0", Input::from(&input))])?;
        let prob = out.remove("activation_10:0").ok_or_else(|| FaceError::UnsupportedModel {
            path: "human/human_selfie.onnx".into(),
            reason: "output `activation_10:0` missing".into(),
        })?;
        let mask: Vec<u8> = prob.iter().map(|&p| (p.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
        let full = resize_linear_u8(&mask, (s, s), 1, (w, h));
        Ok(GrayImage::from_raw(img.width(), img.height(), full).expect("sized w × h"))
    }
}
