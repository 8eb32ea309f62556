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

    /// An image file could not be read from disk.
    #[error("cannot read image `{}`", path.display())]
    ImageRead {
        /// The image file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// An image file is empty, or its header declares a zero width or height.
    #[error("image `{}` is empty (no bytes, or zero width or height)", path.display())]
    EmptyImage {
        /// The image file.
        path: PathBuf,
    },

    /// An image is not in a format this build decodes (PNG, JPEG, BMP and TIFF).
    #[error("image `{}` is not in a supported format (PNG, JPEG, BMP or TIFF)", path.display())]
    UnsupportedImage {
        /// The image file.
        path: PathBuf,
    },

    /// An image's header declares more pixels than the configured limit (a decompression-bomb guard).
    #[error("image `{}` is {width}x{height} pixels, more than the limit of {max_pixels}", path.display())]
    ImageTooLarge {
        /// The image file.
        path: PathBuf,
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The configured limit on `width * height`.
        max_pixels: u64,
    },

    /// Arguments that do not fit together (mismatched sizes, empty inputs, a zero kernel).
    #[error("invalid input: {what}")]
    InvalidInput {
        /// What is wrong, naming the function and argument.
        what: String,
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

    /// Landmarks from which no similarity transform can be estimated (coincident points, mismatched
    /// counts, an unsupported crop size).
    #[error("cannot align landmarks: {reason}")]
    DegenerateLandmarks {
        /// What is wrong with them.
        reason: String,
    },

    /// A detector found no face in the image.
    #[error("no face found in {what}")]
    NoFace {
        /// The image searched (a file name, or a description such as "template image").
        what: String,
    },

    /// A model file loads but does not have the inputs and outputs its wrapper expects.
    #[error("model `{}` is not supported: {reason}", path.display())]
    UnsupportedModel {
        /// The model file (or the output at fault).
        path: PathBuf,
        /// What does not match.
        reason: String,
    },

    /// Any other ONNX Runtime error (for example while running a session).
    #[error(transparent)]
    Ort(#[from] ort::Error),
}
