//! The crate's default detector: MTCNN proposals, each confirmed by MediaPipe BlazeFace on a crop
//! around it. Both models are embedded, so it needs no download.
//!
//! MTCNN keeps its reference P- and R-net thresholds (0.6, 0.7); the O-net's is lowered from the
//! reference's precision-biased 0.7 to 0.5, the decision boundary of its two-way softmax (face
//! more likely than not), which recovers faces the reference drops (bowed heads, closed eyes).
//! Each proposal is then checked by BlazeFace on a square crop 1.5× the proposal's longer side
//! (MediaPipe's detection-to-ROI scale), black outside the image; it is kept when BlazeFace finds
//! a face at MediaPipe's default `min_score_thresh` of 0.5 whose box centre lies inside the
//! proposal's box. The two detectors were trained on different data with different
//! architectures, so textures that fool one (a dress pattern MTCNN scores 0.97) rarely fool both.
//! [`Mtcnn`] with [`MtcnnConfig::default`] remains the bit-exact reference pipeline.

use image::{Rgb, RgbImage, imageops};

use crate::detector::{Face, FaceDetector};
use crate::{BlazeFace, FaceError, Mtcnn, MtcnnConfig};

/// MTCNN stage thresholds of the proposal stage: the reference's P- and R-net values, the O-net at
/// its softmax decision boundary.
pub const PROPOSAL_THRESHOLDS: [f32; 3] = [0.6, 0.7, 0.5];

/// Side of the verification crop relative to the proposal's longer side (MediaPipe's
/// `RectTransformationCalculator` scale for face detections).
pub const CROP_SCALE: f32 = 1.5;

/// MTCNN proposals confirmed by BlazeFace. [`detect`](FaceDetector::detect) returns faces by
/// decreasing MTCNN score, with MTCNN's boxes and landmarks.
#[derive(Debug)]
pub struct VerifiedMtcnn {
    mtcnn: Mtcnn,
    blazeface: BlazeFace,
}

impl VerifiedMtcnn {
    /// The embedded models; `threads` ONNX Runtime intra-op threads (0: auto).
    pub fn new(threads: usize) -> Result<Self, FaceError> {
        let config = MtcnnConfig { steps_threshold: PROPOSAL_THRESHOLDS, ..MtcnnConfig::default() };
        Ok(Self { mtcnn: Mtcnn::with_config(config, threads)?, blazeface: BlazeFace::embedded(threads)? })
    }

    /// Every MTCNN proposal with BlazeFace's best score for it (0 when BlazeFace finds no face
    /// centred inside the proposal's box), by decreasing MTCNN score.
    pub fn proposals(&self, img: &RgbImage) -> Result<Vec<(Face, f32)>, FaceError> {
        self.mtcnn.detect(img)?.into_iter().map(|face| Ok((face, self.confirm(img, &face)?))).collect()
    }

    /// BlazeFace's best score for a face centred inside `face`'s box, on the crop around it.
    fn confirm(&self, img: &RgbImage, face: &Face) -> Result<f32, FaceError> {
        let side = (CROP_SCALE * face.width().max(face.height())).round();
        if side.is_nan() || side < 1.0 {
            return Ok(0.0);
        }
        let (cx, cy) = ((face.bbox[0] + face.bbox[2]) / 2.0, (face.bbox[1] + face.bbox[3]) / 2.0);
        let (x0, y0) = ((cx - side / 2.0).round(), (cy - side / 2.0).round());
        let mut crop = RgbImage::from_pixel(side as u32, side as u32, Rgb([0, 0, 0]));
        imageops::replace(&mut crop, img, -(x0 as i64), -(y0 as i64));
        let [bx1, by1, bx2, by2] = face.bbox;
        Ok(self
            .blazeface
            .detect(&crop)?
            .iter()
            .filter(|d| d.score >= self.blazeface.min_score)
            .filter(|d| {
                let (dx, dy) = ((d.bbox[0] + d.bbox[2]) / 2.0 + x0, (d.bbox[1] + d.bbox[3]) / 2.0 + y0);
                (bx1..=bx2).contains(&dx) && (by1..=by2).contains(&dy)
            })
            .map(|d| d.score)
            .fold(0.0, f32::max))
    }
}

impl FaceDetector for VerifiedMtcnn {
    fn detect(&self, img: &RgbImage) -> Result<Vec<Face>, FaceError> {
        let min = self.blazeface.min_score;
        Ok(self.proposals(img)?.into_iter().filter(|&(_, s)| s >= min).map(|(f, _)| f).collect())
    }
}
