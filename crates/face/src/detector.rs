//! What detectors and embedders produce, and the traits they implement.

use image::RgbImage;

use crate::FaceError;
use crate::align::norm_crop;

/// A detected face, in the pixel coordinates of the image it was found in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Face {
    /// Box corners `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Detector confidence in [0, 1].
    pub score: f32,
    /// Left eye, right eye, nose tip, left and right mouth corners ("left" = image left), the order
    /// of insightface and [`ARCFACE_TEMPLATE`](crate::ARCFACE_TEMPLATE).
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    /// Box width.
    pub fn width(&self) -> f32 {
        self.bbox[2] - self.bbox[0]
    }

    /// Box height.
    pub fn height(&self) -> f32 {
        self.bbox[3] - self.bbox[1]
    }
}

/// A face detector: every face in an image, with five landmarks.
pub trait FaceDetector {
    /// All faces found, in the detector's own order (documented by each implementation); an empty
    /// list when there is none.
    fn detect(&self, img: &RgbImage) -> Result<Vec<Face>, FaceError>;

    /// Like [`detect`](Self::detect), but finding nothing is [`FaceError::NoFace`] naming `what`
    /// (a file name or a role such as "template").
    fn detect_some(&self, img: &RgbImage, what: &str) -> Result<Vec<Face>, FaceError> {
        let faces = self.detect(img)?;
        if faces.is_empty() { Err(FaceError::NoFace { what: what.to_string() }) } else { Ok(faces) }
    }
}

/// An identity embedder: an aligned face crop to an L2-normalised vector, so that the dot product
/// of two embeddings is their cosine similarity.
pub trait FaceEmbedder {
    /// Side of the square aligned crop the model takes.
    fn input_size(&self) -> u32;

    /// The embedding of an already aligned `input_size`² crop.
    fn embed_aligned(&self, crop: &RgbImage) -> Result<Vec<f32>, FaceError>;

    /// Aligns `face` with [`norm_crop`] at [`input_size`](Self::input_size) and embeds it.
    fn embed(&self, img: &RgbImage, face: &Face) -> Result<Vec<f32>, FaceError> {
        self.embed_aligned(&norm_crop(img, &face.landmarks, self.input_size())?)
    }

    /// The embeddings of several aligned crops; one model run per crop unless an implementation
    /// batches them.
    fn embed_aligned_batch(&self, crops: &[RgbImage]) -> Result<Vec<Vec<f32>>, FaceError> {
        crops.iter().map(|crop| self.embed_aligned(crop)).collect()
    }

    /// Aligns and embeds every face of `img` (see [`embed_aligned_batch`](Self::embed_aligned_batch)).
    fn embed_all(&self, img: &RgbImage, faces: &[Face]) -> Result<Vec<Vec<f32>>, FaceError> {
        let size = self.input_size();
        let crops = faces.iter().map(|f| norm_crop(img, &f.landmarks, size)).collect::<Result<Vec<_>, _>>()?;
        self.embed_aligned_batch(&crops)
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn l2_normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
    }
    v
}

/// Cosine similarity of two vectors (their dot product when both are normalised).
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { (dot / (na * nb)) as f32 }
}
