//! SCRFD (insightface's detector: `det_10g.onnx`, `det_2.5g.onnx`, `det_500m.onnx` of the model
//! packs), run as insightface 2.1's `model_zoo/scrfd.py` runs it.
//!
//! The image is resized into a `det_size` canvas keeping its aspect ratio (`cv2.resize`, top-left,
//! zero padding), normalised as `(v − 127.5) / 128` in RGB; each stride's anchor centres (one cell
//! per stride, `anchors` per cell) are offset by the predicted distances × stride; scores ≥
//! `det_thresh` are kept, sorted (stable) by score, and suppressed greedily at IoU > `nms_thresh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use ndarray::{Array4, ArrayD};

use crate::detector::{Face, FaceDetector};
use crate::resample::resize_linear_u8;
use crate::{FaceError, Input, OnnxModel};

/// SCRFD settings, with insightface's defaults (`FaceAnalysis.prepare(det_size=(640, 640))`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScrfdConfig {
    /// Network input `(width, height)`; the image is fitted into it.
    pub det_size: (u32, u32),
    /// Minimum score.
    pub det_thresh: f32,
    /// Suppression IoU threshold.
    pub nms_thresh: f32,
}

impl Default for ScrfdConfig {
    fn default() -> Self {
        Self { det_size: (640, 640), det_thresh: 0.5, nms_thresh: 0.4 }
    }
}

/// An SCRFD model with keypoints (9 outputs: strides 8/16/32 with 2 anchors per cell, or 15:
/// strides 8–128 with 1). [`detect`](FaceDetector::detect) returns faces by decreasing score.
#[derive(Debug)]
pub struct Scrfd {
    model: OnnxModel,
    input: String,
    /// Output names: scores per stride, then boxes per stride, then keypoints per stride (a
    /// leading batch axis of 1, where a model has one, leaves the row-major data unchanged).
    outputs: Vec<String>,
    strides: Vec<usize>,
    anchors: usize,
    config: ScrfdConfig,
}

impl Scrfd {
    /// Loads an SCRFD ONNX file with default settings.
    pub fn load(path: impl AsRef<Path>, threads: usize) -> Result<Self, FaceError> {
        Self::load_with(path, ScrfdConfig::default(), threads)
    }

    /// Loads an SCRFD ONNX file with custom settings.
    pub fn load_with(path: impl AsRef<Path>, config: ScrfdConfig, threads: usize) -> Result<Self, FaceError> {
        let path = path.as_ref();
        let model = OnnxModel::load(path, threads)?;
        let unsupported = |reason: String| FaceError::UnsupportedModel { path: path.to_path_buf(), reason };
        let (strides, anchors) = match model.outputs().len() {
            9 => (vec![8, 16, 32], 2),
            15 => (vec![8, 16, 32, 64, 128], 1),
            n => {
                return Err(unsupported(format!(
                    "{n} outputs; an SCRFD model with keypoints has 9 (det_10g, det_2.5g, det_500m) or 15"
                )));
            }
        };
        let input =
            model.inputs().first().map(|(name, _)| name.clone()).ok_or_else(|| unsupported("no input".into()))?;
        let outputs: Vec<String> = model.outputs().iter().map(|(name, _)| name.clone()).collect();
        Ok(Self { model, input, outputs, strides, anchors, config })
    }

    /// The settings in use.
    pub fn config(&self) -> &ScrfdConfig {
        &self.config
    }

    /// Changes the settings.
    pub fn set_config(&mut self, config: ScrfdConfig) {
        self.config = config;
    }

    /// The fitted, padded network input and the scale from image to network pixels (f32, as
    /// numpy applies it).
    fn blob(&self, img: &RgbImage) -> (Array4<f32>, f32) {
        let (dw, dh) = (self.config.det_size.0 as usize, self.config.det_size.1 as usize);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let im_ratio = h as f64 / w as f64;
        let (nw, nh) = if im_ratio > dh as f64 / dw as f64 {
            ((dh as f64 / im_ratio) as usize, dh)
        } else {
            (dw, (dw as f64 * im_ratio) as usize)
        };
        let (nw, nh) = (nw.clamp(1, dw), nh.clamp(1, dh));
        let scale = (nh as f64 / h as f64) as f32;
        let resized = resize_linear_u8(img.as_raw(), (w, h), 3, (nw, nh));
        // Padding is (0 − 127.5) / 128; each plane's rows are filled from the resized rows.
        let mut blob = Array4::from_elem((1, 3, dh, dw), -127.5 * 0.0078125);
        let data = blob.as_slice_mut().expect("a new array is contiguous");
        for (c, plane) in data.chunks_exact_mut(dw * dh).enumerate() {
            for (row, src) in plane.chunks_exact_mut(dw).zip(resized.chunks_exact(nw * 3)) {
                for (v, px) in row.iter_mut().zip(src.chunks_exact(3)) {
                    *v = (f32::from(px[c]) - 127.5) * 0.0078125;
                }
            }
        }
        (blob, scale)
    }

    fn output<'a>(&self, out: &'a HashMap<String, ArrayD<f32>>, i: usize) -> Result<&'a [f32], FaceError> {
        let name = &self.outputs[i];
        let array = out.get(name).ok_or_else(|| FaceError::UnsupportedModel {
            path: PathBuf::from(name),
            reason: format!("output `{name}` missing"),
        })?;
        let slice = array.as_slice().ok_or_else(|| FaceError::UnsupportedModel {
            path: PathBuf::from(name),
            reason: format!("output `{name}` is not contiguous"),
        })?;
        Ok(slice)
    }
}

impl FaceDetector for Scrfd {
    fn detect(&self, img: &RgbImage) -> Result<Vec<Face>, FaceError> {
        if img.width() == 0 || img.height() == 0 {
            return Ok(Vec::new());
        }
        let (blob, scale) = self.blob(img);
        let (dw, dh) = (self.config.det_size.0 as usize, self.config.det_size.1 as usize);
        let out = self.model.run(&[(self.input.as_str(), Input::from(&blob))])?;
        let fmc = self.strides.len();
        let mut cands: Vec<([f32; 5], [[f32; 2]; 5])> = Vec::new();
        for (level, &stride) in self.strides.iter().enumerate() {
            let scores = self.output(&out, level)?;
            let boxes = self.output(&out, level + fmc)?;
            let kps = self.output(&out, level + 2 * fmc)?;
            let gw = dw / stride;
            let n = gw * (dh / stride) * self.anchors;
            if scores.len() < n || boxes.len() < 4 * n || kps.len() < 10 * n {
                return Err(FaceError::BadShape {
                    name: self.outputs[level].clone(),
                    expected: vec![n as i64, 1],
                    found: vec![scores.len()],
                });
            }
            let s = stride as f32;
            for (a, &score) in scores[..n].iter().enumerate() {
                if score < self.config.det_thresh {
                    continue;
                }
                let cell = a / self.anchors;
                let (cx, cy) = (((cell % gw) * stride) as f32, ((cell / gw) * stride) as f32);
                let d = &boxes[4 * a..4 * a + 4];
                let k = &kps[10 * a..10 * a + 10];
                let bbox = [cx - d[0] * s, cy - d[1] * s, cx + d[2] * s, cy + d[3] * s];
                let marks: [[f32; 2]; 5] = std::array::from_fn(|i| [cx + k[2 * i] * s, cy + k[2 * i + 1] * s]);
                cands.push((
                    [bbox[0] / scale, bbox[1] / scale, bbox[2] / scale, bbox[3] / scale, score],
                    marks.map(|[x, y]| [x / scale, y / scale]),
                ));
            }
        }
        cands.sort_by(|a, b| b.0[4].total_cmp(&a.0[4])); // stable, as numpy's argsort(kind="stable")
        let keep = nms(&cands, self.config.nms_thresh);
        Ok(keep
            .into_iter()
            .map(|i| {
                let (b, marks) = cands[i];
                Face { bbox: [b[0], b[1], b[2], b[3]], score: b[4], landmarks: marks }
            })
            .collect())
    }
}

/// insightface's `SCRFD.nms` on score-sorted candidates, in f32: IoU with inclusive pixel
/// areas, a candidate dropped when its IoU with a kept one exceeds `thresh`.
fn nms(cands: &[([f32; 5], [[f32; 2]; 5])], thresh: f32) -> Vec<usize> {
    let area = |b: &[f32; 5]| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0);
    let mut order: Vec<usize> = (0..cands.len()).collect();
    let mut keep = Vec::new();
    while let Some((&i, rest)) = order.split_first() {
        keep.push(i);
        let bi = &cands[i].0;
        let ai = area(bi);
        order = rest
            .iter()
            .copied()
            .filter(|&j| {
                let bj = &cands[j].0;
                let w = (bi[2].min(bj[2]) - bi[0].max(bj[0]) + 1.0).max(0.0);
                let h = (bi[3].min(bj[3]) - bi[1].max(bj[1]) + 1.0).max(0.0);
                let inter = w * h;
                inter / (ai + area(bj) - inter) <= thresh
            })
            .collect();
    }
    keep
}
