//! Face analysis for EasyPhoto: ONNX models run through ONNX Runtime.
//!
//! * [`runtime`]: loads ONNX Runtime once per process (from `ORT_DYLIB_PATH`, ONNX Runtime ≥ 1.31)
//!   and wraps a session in [`OnnxModel`], with named f32/i32 inputs and f32 outputs.
//! * [`preprocess`]: image decoding and conversion to NCHW tensors.
//! * [`error`]: [`FaceError`], which names the file or tensor at fault.

pub mod error;
pub mod preprocess;
pub mod runtime;

pub use error::FaceError;
pub use preprocess::{load_rgb, to_nchw_signed};
pub use runtime::{Input, OnnxModel, environment};
