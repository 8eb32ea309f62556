//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `easyphoto-face`; each variant names the file or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    /// The ONNX Runtime shared library could not be loaded (missing, not ONNX Runtime, or older than 1.31).
    #[error(
        "cannot load the ONNX Runtime library `{}`; install onnxruntime >= 1.31 \
         (e.g. `pip install onnxruntime==1.32.0`) and set ORT_DYLIB_PATH to the full path of its \
         libonnxruntime shared library (site-packages/onnxruntime/capi/libonnxruntime.so.<version>)",
        path.display()
    )]
    RuntimeUnavailable {
        /// The library path that was tried.
        path: PathBuf,
        /// Why loading failed.
        #[source]
        source: ort::LoadDynamicError,
    },

    /// ONNX Runtime could not open or parse a model file.
    #[error("cannot load ONNX model `{}`", path.display())]
    ModelLoad {
        /// The model file.
        path: PathBuf,
        /// The runtime's error.
        #[source]
        source: ort::Error,
    },

    /// An image file could not be read or decoded.
    #[error("cannot decode image `{}`", path.display())]
    ImageDecode {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },

    /// A tensor's shape does not match what the model declares.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?} (-1: any size)")]
    BadShape {
        /// The tensor (model input) name.
        name: String,
        /// The declared shape; -1 marks a dynamic dimension.
        expected: Vec<i64>,
        /// The shape that was passed.
        found: Vec<usize>,
    },

    /// Any other ONNX Runtime error (for example while running a session).
    #[error(transparent)]
    Ort(#[from] ort::Error),
}
