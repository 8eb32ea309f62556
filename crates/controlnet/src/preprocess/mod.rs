//! Conditioning preprocessors: plain functions from an image to the control image a ControlNet unit
//! takes, as the WebUI annotators and EasyPhoto compute them.
//!
//! - [`canny`](mod@canny): `cv2.Canny` edges (the canny unit).
//! - [`color`]: EasyPhoto's colour map (the random-colour unit).
//! - [`tile`]: `tile_resample` (the tile unit).
//! - [`openpose`]: body skeletons and their picture (the openpose unit).
//! - [`resize`](mod@resize): `cv2.resize` with OpenCV's coefficients, which the others build on.

pub mod canny;
pub mod color;
pub mod openpose;
pub mod resize;
pub mod tile;

pub use canny::{annotate_canny, annotate_canny_webui, canny};
pub use color::color_map;
pub use resize::{Interpolation, resize, resize_map, resize_short_side};
pub use tile::tile_resample;

/// Everything that can go wrong in a preprocessor.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// A resize from or to an image without pixels.
    #[error("cannot resize {from:?} to {to:?}: empty image")]
    EmptySize {
        /// Source (width, height).
        from: (u32, u32),
        /// Destination (width, height).
        to: (u32, u32),
    },
    /// ONNX Runtime could not be loaded from `path`.
    #[error(
        "cannot load ONNX Runtime from {path} (set ORT_DYLIB_PATH to libonnxruntime, version 1.31 or newer): {source}"
    )]
    RuntimeUnavailable {
        /// The library path tried.
        path: std::path::PathBuf,
        /// Why loading failed.
        source: ort::LoadDynamicError,
    },
    /// An ONNX model file could not be loaded.
    #[error("cannot load ONNX model {path}: {source}")]
    ModelLoad {
        /// The model file.
        path: std::path::PathBuf,
        /// Why loading failed.
        source: ort::Error,
    },
    /// A model returned an output of another shape than expected.
    #[error("model output has shape {found:?}, expected {expected:?}")]
    UnexpectedOutput {
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape returned.
        found: Vec<usize>,
    },
    /// A checkpoint could not be read, or its tensors do not fit the network.
    #[error("checkpoint {path}: {source}")]
    Checkpoint {
        /// The checkpoint file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: candle_core::Error,
    },
    /// A weight the network needs is not in the checkpoint.
    #[error("checkpoint {path} has no weight `{key}`")]
    MissingWeight {
        /// The checkpoint file.
        path: std::path::PathBuf,
        /// The missing key, e.g. `Mconv7_stage6_L2.weight`.
        key: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// ONNX Runtime failed while running a model.
    #[error(transparent)]
    Ort(#[from] ort::Error),
    /// A parameter outside the range the preprocessor accepts.
    #[error("invalid preprocessor parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}
