//! Face regions from MediaPipe FaceMesh's 468 landmarks, the stand-in for EasyPhoto's BiSeNet face
//! parsing: the [`FaceParser`] trait (which a BiSeNet implementation can also implement) and
//! [`FaceMesh`].
//!
//! The mesh runs on a 192² crop of the face: centred on the detection box, 1.5× its longer side,
//! rotated so that the eyes are level (MediaPipe's face-detection-to-ROI rule, with the five
//! landmarks of any [`FaceDetector`](crate::FaceDetector)). Regions are the polygons of MediaPipe's
//! `FACEMESH_*` contours, filled.

use std::path::Path;

use image::{GrayImage, Luma, RgbImage};
use imageproc::drawing::draw_polygon_mut;
use imageproc::point::Point;
use ndarray::Array4;

use crate::align::{Similarity, warp_affine};
use crate::detector::Face;
use crate::{FaceError, Input, OnnxModel};

const SIZE: u32 = 192;

/// MediaPipe's `face_landmark.onnx` (Apache-2.0; provenance in `assets/mediapipe/LICENSE.md`).
static FACE_LANDMARK: &[u8] = include_bytes!("../assets/mediapipe/face_landmark.onnx");

/// Full-image masks (255 inside) of one face's regions.
#[derive(Debug, Clone, PartialEq)]
pub struct FaceRegions {
    /// The face oval.
    pub face_oval: GrayImage,
    /// Skin: the face oval without eyes, brows and lips.
    pub skin: GrayImage,
    /// Both eyes.
    pub eyes: GrayImage,
    /// Both eyebrows.
    pub brows: GrayImage,
    /// Both lips (the outer lip contour).
    pub lips: GrayImage,
}

/// A face parser: region masks of one detected face.
pub trait FaceParser {
    /// The regions of `face` in `img`.
    fn parse(&self, img: &RgbImage, face: &Face) -> Result<FaceRegions, FaceError>;
}

/// MediaPipe's contour of the face oval (landmark indices, in order around the face).
pub const FACE_OVAL: [usize; 36] = [
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150,
    136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
];
/// The eye on the subject's left (image right).
pub const LEFT_EYE: [usize; 16] = [263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466];
/// The eye on the subject's right (image left).
pub const RIGHT_EYE: [usize; 16] = [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246];
/// The subject's left eyebrow: its lower edge, then its upper edge back.
pub const LEFT_BROW: [usize; 10] = [276, 283, 282, 295, 285, 336, 296, 334, 293, 300];
/// The subject's right eyebrow: its lower edge, then its upper edge back.
pub const RIGHT_BROW: [usize; 10] = [46, 53, 52, 65, 55, 107, 66, 105, 63, 70];
/// The outer contour of the lips.
pub const LIPS: [usize; 20] =
    [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185];

/// MediaPipe FaceMesh (`face_landmark.onnx`: input `input_1` [1, 3, 192, 192] RGB in [-1, 1];
/// outputs `conv2d_20` [1, 1404, 1, 1], 468 × (x, y, z) in crop pixels, and `conv2d_30`, the
/// face-presence logit).
#[derive(Debug)]
pub struct FaceMesh {
    model: OnnxModel,
}

/// 468 landmarks `(x, y, z)` in image pixels (z in crop pixels, relative depth) and the face
/// presence probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Mesh {
    /// The landmarks.
    pub points: Vec<[f32; 3]>,
    /// Probability that the crop holds a face.
    pub presence: f32,
}

impl FaceMesh {
    /// Loads `face_landmark.onnx`.
    pub fn load(path: impl AsRef<Path>, threads: usize) -> Result<Self, FaceError> {
        Ok(Self { model: OnnxModel::load(path, threads)? })
    }

    /// The embedded `face_landmark.onnx` (no download).
    pub fn embedded(threads: usize) -> Result<Self, FaceError> {
        Ok(Self { model: OnnxModel::from_memory(FACE_LANDMARK, "face_landmark.onnx", threads)? })
    }

    /// The mesh of `face`.
    pub fn mesh(&self, img: &RgbImage, face: &Face) -> Result<Mesh, FaceError> {
        let [le, re] = [face.landmarks[0], face.landmarks[1]];
        let angle = f64::from(re[1] - le[1]).atan2(f64::from(re[0] - le[0]));
        let (cx, cy) = (f64::from(face.bbox[0] + face.bbox[2]) / 2.0, f64::from(face.bbox[1] + face.bbox[3]) / 2.0);
        let side = 1.5 * f64::from(face.width().max(face.height()));
        if side.is_nan() || side <= 1.0 {
            return Err(FaceError::DegenerateLandmarks { reason: format!("face box {:?} is empty", face.bbox) });
        }
        // Crop pixel (u, v) -> image: rotate by the eye angle about the box centre.
        let k = side / f64::from(SIZE);
        let (a, b) = (k * angle.cos(), k * angle.sin());
        let half = f64::from(SIZE) / 2.0;
        let to_image = Similarity { a, b, tx: cx - (a * half - b * half), ty: cy - (b * half + a * half) };
        let m = to_image.matrix();
        let to_crop = crate::align::invert_affine(&m);
        let crop = warp_affine(img, &to_crop, SIZE, SIZE);
        let s = SIZE as usize;
        let raw = crop.as_raw();
        let input =
            Array4::from_shape_fn((1, 3, s, s), |(_, c, y, x)| f32::from(raw[(y * s + x) * 3 + c]) / 127.5 - 1.0);
        let out = self.model.run(&[("input_1", Input::from(&input))])?;
        let output = |name: &str| {
            out.get(name).ok_or_else(|| FaceError::UnsupportedModel {
                path: name.into(),
                reason: format!("FaceMesh output `{name}` missing"),
            })
        };
        let (pts, presence) = (output("conv2d_20")?, output("conv2d_30")?);
        if pts.len() != 1404 || presence.is_empty() {
            return Err(FaceError::BadShape {
                name: "conv2d_20".into(),
                expected: vec![1, 1404, 1, 1],
                found: pts.shape().to_vec(),
            });
        }
        let p: Vec<f32> = pts.iter().copied().collect();
        let points = p
            .chunks_exact(3)
            .map(|c| {
                let [x, y] = to_image.apply([c[0], c[1]]);
                [x, y, c[2]]
            })
            .collect();
        let logit = presence.iter().next().copied().unwrap_or(f32::NEG_INFINITY);
        Ok(Mesh { points, presence: 1.0 / (1.0 + (-logit).exp()) })
    }
}

impl FaceParser for FaceMesh {
    fn parse(&self, img: &RgbImage, face: &Face) -> Result<FaceRegions, FaceError> {
        Ok(regions(&self.mesh(img, face)?, img.width(), img.height()))
    }
}

/// The region masks of a mesh, for an image of `width`×`height`.
pub fn regions(mesh: &Mesh, width: u32, height: u32) -> FaceRegions {
    let fill = |mask: &mut GrayImage, contour: &[usize]| {
        let mut poly: Vec<Point<i32>> = contour
            .iter()
            .map(|&i| Point::new(mesh.points[i][0].round() as i32, mesh.points[i][1].round() as i32))
            .collect();
        poly.dedup();
        if poly.len() > 2 && poly.first() == poly.last() {
            poly.pop();
        }
        if poly.len() > 2 {
            draw_polygon_mut(mask, &poly, Luma([255]));
        }
    };
    let blank = GrayImage::new(width, height);
    let (mut face_oval, mut eyes, mut brows, mut lips) = (blank.clone(), blank.clone(), blank.clone(), blank);
    fill(&mut face_oval, &FACE_OVAL);
    fill(&mut eyes, &LEFT_EYE);
    fill(&mut eyes, &RIGHT_EYE);
    fill(&mut brows, &LEFT_BROW);
    fill(&mut brows, &RIGHT_BROW);
    fill(&mut lips, &LIPS);
    let mut skin = face_oval.clone();
    for ((s, e), (b, l)) in skin.iter_mut().zip(eyes.iter()).zip(brows.iter().zip(lips.iter())) {
        if *e > 0 || *b > 0 || *l > 0 {
            *s = 0;
        }
    }
    FaceRegions { face_oval, skin, eyes, brows, lips }
}
