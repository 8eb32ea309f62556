//! The download-free pose estimator: MoveNet Lightning (17 COCO keypoints) in ONNX Runtime, mapped to
//! the 18 OpenPose body parts (the neck is the midpoint of the shoulders).
//!
//! The model (`human_movenet-lightning.onnx`) takes int32 `[1, 192, 192, 3]` RGB in 0..255 and returns
//! `[1, 1, 17, 3]` = (y, x, score), normalised to its square input. The image is padded at the right
//! or bottom to a square, then resized to 192².
//!
//! ONNX Runtime is loaded at run time (ort's `load-dynamic`) from `ORT_DYLIB_PATH`, or the platform's
//! default library name on the loader path.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use image::RgbImage;
use ndarray::Array4;
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;

use super::{Body, Keypoint, draw_bodypose};
use crate::preprocess::{Interpolation, PreprocessError, resize};

/// Side of MoveNet Lightning's square input.
pub const INPUT_SIZE: u32 = 192;
/// Default score below which a keypoint counts as not found.
pub const MIN_SCORE: f64 = 0.3;

/// OpenPose-18 index of each COCO-17 keypoint (nose, eyes, ears, shoulders, elbows, wrists, hips,
/// knees, ankles; left before right).
const COCO_TO_OPENPOSE: [usize; 17] = [0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10];

/// The process-wide ONNX Runtime environment, set by the first successful load.
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

fn environment() -> Result<Environment, PreprocessError> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(env) = slot.as_ref() {
        return Ok(env.clone());
    }
    let path: PathBuf = match std::env::var_os("ORT_DYLIB_PATH") {
        Some(path) if !path.is_empty() => path.into(),
        _ => format!("{}onnxruntime{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX).into(),
    };
    let builder = ort::init_from(&path).map_err(|source| PreprocessError::RuntimeUnavailable { path, source })?;
    let env = builder.with_name("easyphoto-controlnet").build()?;
    *slot = Some(env.clone());
    Ok(env)
}

/// MoveNet Lightning on the CPU. `Send + Sync`; concurrent calls take turns.
#[derive(Debug)]
pub struct MoveNet {
    session: Mutex<Session>,
}

impl MoveNet {
    /// Loads `human_movenet-lightning.onnx` (or a model with the same input and output).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PreprocessError> {
        Self::load_in(path, &environment()?)
    }

    /// [`load`](Self::load) on an ONNX Runtime environment made elsewhere (a process can hold only
    /// one, e.g. the face crate's).
    pub fn load_in(path: impl AsRef<Path>, env: &Environment) -> Result<Self, PreprocessError> {
        let path = path.as_ref();
        let session = Session::builder(env)
            .and_then(|mut builder| builder.commit_from_file(path))
            .map_err(|source| PreprocessError::ModelLoad { path: path.to_path_buf(), source })?;
        Ok(Self { session: Mutex::new(session) })
    }

    /// The 17 COCO keypoints of the most prominent person: (x, y, score) with x and y normalised to
    /// the image width and height.
    pub fn keypoints(&self, image: &RgbImage) -> Result<[(f64, f64, f64); 17], PreprocessError> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(PreprocessError::EmptySize { from: (w, h), to: (INPUT_SIZE, INPUT_SIZE) });
        }
        let side = w.max(h);
        let mut square = RgbImage::new(side, side);
        image::imageops::replace(&mut square, image, 0, 0);
        let interpolation = if side > INPUT_SIZE { Interpolation::Area } else { Interpolation::Cubic };
        let input = resize(&square, INPUT_SIZE, INPUT_SIZE, interpolation)?;
        let n = INPUT_SIZE as usize;
        let tensor = Array4::from_shape_vec((1, n, n, 3), input.as_raw().iter().map(|&v| i32::from(v)).collect())
            .expect("192 * 192 * 3 values");

        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let input: SessionInputValue<'_> = TensorRef::from_array_view(&tensor)?.into();
        let outputs = session.run(vec![("input:0", input)])?;
        let values = outputs[0].try_extract_array::<f32>()?;
        if values.shape() != [1, 1, 17, 3] {
            return Err(PreprocessError::UnexpectedOutput {
                expected: vec![1, 1, 17, 3],
                found: values.shape().to_vec(),
            });
        }
        let scale = (f64::from(side) / f64::from(w), f64::from(side) / f64::from(h));
        Ok(std::array::from_fn(|k| {
            let (y, x, score) = (values[[0, 0, k, 0]], values[[0, 0, k, 1]], values[[0, 0, k, 2]]);
            (f64::from(x) * scale.0, f64::from(y) * scale.1, f64::from(score))
        }))
    }

    /// The OpenPose-18 body of the most prominent person (see [`coco_to_openpose`]).
    pub fn body(&self, image: &RgbImage, min_score: f64) -> Result<Body, PreprocessError> {
        Ok(coco_to_openpose(&self.keypoints(image)?, min_score))
    }

    /// The openpose control image: the body skeleton drawn on black, at the image's size.
    pub fn control_image(&self, image: &RgbImage) -> Result<RgbImage, PreprocessError> {
        let body = self.body(image, MIN_SCORE)?;
        let mut canvas = RgbImage::new(image.width(), image.height());
        draw_bodypose(&mut canvas, &body);
        Ok(canvas)
    }
}

/// COCO-17 keypoints (x, y, score) mapped to the 18 OpenPose parts; parts scoring below `min_score`
/// are left out, and the neck is the shoulders' midpoint (scored by the weaker shoulder) when both
/// are found.
pub fn coco_to_openpose(coco: &[(f64, f64, f64); 17], min_score: f64) -> Body {
    let mut body: Body = [None; 18];
    for (&(x, y, score), &part) in coco.iter().zip(&COCO_TO_OPENPOSE) {
        if score >= min_score {
            body[part] = Some(Keypoint { x, y, score });
        }
    }
    if let (Some(r), Some(l)) = (body[2], body[5]) {
        body[1] = Some(Keypoint { x: (r.x + l.x) / 2.0, y: (r.y + l.y) / 2.0, score: r.score.min(l.score) });
    }
    body
}
