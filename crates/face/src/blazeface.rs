//! MediaPipe BlazeFace (short range, 128² input, 896 anchors): face boxes with six keypoints, the
//! first stage of MediaPipe's face mesh.
//!
//! Decoding follows MediaPipe's `TensorsToDetectionsCalculator` options for this model: SSD anchors
//! (strides 8, 16, 16, 16; fixed size; 2 and 6 per cell), offsets scaled by 1/128, sigmoid scores
//! clipped at ±100, threshold 0.5, boxes of negative size dropped, then weighted non-maximum
//! suppression at IoU 0.3. The image is
//! letterboxed to a square (centred, black bars) as MediaPipe keeps the aspect ratio.

use std::path::Path;

use image::{Rgb, RgbImage, imageops};

use crate::{FaceError, Input, OnnxModel, to_nchw_signed};

const SIZE: u32 = 128;

/// MediaPipe's `face_detection_short_range.onnx` (Apache-2.0; provenance in
/// `assets/mediapipe/LICENSE.md`).
static SHORT_RANGE: &[u8] = include_bytes!("../assets/mediapipe/face_detection_short_range.onnx");

/// One BlazeFace detection, in image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlazeDetection {
    /// Box corners `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Score in [0, 1].
    pub score: f32,
    /// MediaPipe's keypoints: the eye on the image's left, the eye on the image's right, nose tip,
    /// mouth centre, the ear tragions (image left, image right).
    pub keypoints: [[f32; 2]; 6],
}

/// The BlazeFace short-range detector.
#[derive(Debug)]
pub struct BlazeFace {
    model: OnnxModel,
    anchors: Vec<[f32; 2]>,
    /// Minimum score (MediaPipe: 0.5).
    pub min_score: f32,
}

impl BlazeFace {
    /// Loads `face_detection_short_range.onnx` (input `input` [1, 3, 128, 128] RGB in [-1, 1],
    /// outputs `regressors` [1, 896, 16] and `classificators` [1, 896, 1]).
    pub fn load(path: impl AsRef<Path>, threads: usize) -> Result<Self, FaceError> {
        Ok(Self { model: OnnxModel::load(path, threads)?, anchors: anchors(), min_score: 0.5 })
    }

    /// The embedded `face_detection_short_range.onnx` (no download).
    pub fn embedded(threads: usize) -> Result<Self, FaceError> {
        let model = OnnxModel::from_memory(SHORT_RANGE, "face_detection_short_range.onnx", threads)?;
        Ok(Self { model, anchors: anchors(), min_score: 0.5 })
    }

    /// All faces, by decreasing score.
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<BlazeDetection>, FaceError> {
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Ok(Vec::new());
        }
        let side = w.max(h);
        let (ox, oy) = ((side - w) / 2, (side - h) / 2);
        let mut square = RgbImage::from_pixel(side, side, Rgb([0, 0, 0]));
        imageops::replace(&mut square, img, i64::from(ox), i64::from(oy));
        let input = to_nchw_signed(&square, SIZE, SIZE);
        let out = self.model.run(&[("input", Input::from(&input))])?;
        let output = |name: &str| {
            out.get(name).and_then(|a| a.as_slice()).ok_or_else(|| FaceError::UnsupportedModel {
                path: name.into(),
                reason: format!("BlazeFace output `{name}` missing"),
            })
        };
        let (reg, cls) = (output("regressors")?, output("classificators")?);
        if reg.len() != self.anchors.len() * 16 || cls.len() != self.anchors.len() {
            return Err(FaceError::BadShape {
                name: "regressors".into(),
                expected: vec![1, self.anchors.len() as i64, 16],
                found: vec![reg.len() / 16, 16],
            });
        }
        let scale = side as f32;
        let to_image = |[x, y]: [f32; 2]| [x * scale - ox as f32, y * scale - oy as f32];
        let mut cands: Vec<BlazeDetection> = Vec::new();
        for (i, anchor) in self.anchors.iter().enumerate() {
            let score = 1.0 / (1.0 + (-cls[i].clamp(-100.0, 100.0)).exp());
            if score < self.min_score {
                continue;
            }
            let r = &reg[i * 16..i * 16 + 16];
            let s = SIZE as f32;
            let (cx, cy) = (r[0] / s + anchor[0], r[1] / s + anchor[1]);
            let (bw, bh) = (r[2] / s, r[3] / s);
            if !(bw >= 0.0 && bh >= 0.0) {
                continue; // MediaPipe drops boxes of negative (or NaN) size
            }
            let [x1, y1] = to_image([cx - bw / 2.0, cy - bh / 2.0]);
            let [x2, y2] = to_image([cx + bw / 2.0, cy + bh / 2.0]);
            let keypoints =
                std::array::from_fn(|k| to_image([r[4 + 2 * k] / s + anchor[0], r[5 + 2 * k] / s + anchor[1]]));
            cands.push(BlazeDetection { bbox: [x1, y1, x2, y2], score, keypoints });
        }
        Ok(weighted_nms(cands, 0.3))
    }
}

/// MediaPipe's SSD anchor centres for the short-range model (fixed-size anchors: only centres).
fn anchors() -> Vec<[f32; 2]> {
    let mut out = Vec::with_capacity(896);
    for (stride, per_cell) in [(8u32, 2), (16, 6)] {
        let grid = SIZE / stride;
        for y in 0..grid {
            for x in 0..grid {
                let c = [(x as f32 + 0.5) / grid as f32, (y as f32 + 0.5) / grid as f32];
                out.extend(std::iter::repeat_n(c, per_cell));
            }
        }
    }
    out
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// MediaPipe's weighted suppression: the best remaining detection absorbs every other with IoU
/// above `threshold`; its box and keypoints become their score-weighted mean, its score stays.
fn weighted_nms(mut cands: Vec<BlazeDetection>, threshold: f32) -> Vec<BlazeDetection> {
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut out = Vec::new();
    while !cands.is_empty() {
        let top = cands[0];
        let (cluster, rest): (Vec<_>, Vec<_>) = cands.into_iter().partition(|d| iou(&top.bbox, &d.bbox) > threshold);
        let total: f32 = cluster.iter().map(|d| d.score).sum();
        let mut merged = top;
        merged.bbox = std::array::from_fn(|i| cluster.iter().map(|d| d.bbox[i] * d.score).sum::<f32>() / total);
        merged.keypoints = std::array::from_fn(|k| {
            std::array::from_fn(|j| cluster.iter().map(|d| d.keypoints[k][j] * d.score).sum::<f32>() / total)
        });
        out.push(merged);
        cands = rest;
    }
    out
}
