//! Face analysis for EasyPhoto: ONNX models run through ONNX Runtime.
//!
//! * [`runtime`]: loads ONNX Runtime once per process (from `ORT_DYLIB_PATH`, ONNX Runtime ≥ 1.31)
//!   and wraps a session in [`OnnxModel`], with named f32/i32 inputs and f32 outputs.
//! * [`preprocess`]: image decoding (EXIF orientation, grey, alpha, 16-bit, pixel limit) and
//!   conversion to NCHW tensors.
//! * [`align`]: five-point similarity alignment (Umeyama) and `cv2.warpAffine`-exact resampling.
//! * [`detector`]: [`Face`], and the [`FaceDetector`] and [`FaceEmbedder`] traits.
//! * [`mtcnn`]: the built-in MTCNN detector (embedded weights, no download), bit-exact with the
//!   reference pipeline.
//! * [`verified`]: the default detector, MTCNN proposals confirmed by BlazeFace (both embedded).
//! * [`scrfd`], [`arcface`]: insightface's detector and recogniser ONNX models (user-supplied).
//! * [`faceres`]: a real 1024-d identity embedder (Human's faceres ONNX, user-supplied path).
//! * [`segment`]: the [`Segmenter`] trait, U²-Net (rembg's processing) and the embedded selfie model.
//! * [`blazeface`], [`facemesh`]: MediaPipe's detector and 468-point mesh, and region masks (skin,
//!   eyes, brows, lips, face oval) behind the [`FaceParser`] trait.
//! * [`resample`]: `cv2.resize`- and Pillow-exact resizing for the models' inputs.
//! * [`geometry`]: EasyPhoto's box rules (expansion by a ratio, left-to-right order, roll score,
//!   training box) and PIL-style crops.
//! * [`ranking`]: identity ranking of training photos (mean-embedding pivot, reference photo, top 15).
//! * [`morphology`]: `cv2.dilate` / `erode` / `MORPH_CLOSE` / `blur`-exact mask operations.
//! * [`masks`]: box and training masks, blending through feathered masks, paste-back.
//! * [`color`]: OpenCV-exact 8-bit L\*a\*b\* and EasyPhoto's colour shift (Reinhard transfer).
//! * [`fusion`]: the [`FaceFusion`](fusion::FaceFusion) trait and a classical (model-free) fusion.
//! * [`error`]: [`FaceError`], which names the file or tensor at fault.

pub mod align;
pub mod arcface;
pub mod blazeface;
pub mod color;
pub mod detector;
pub mod error;
pub mod facemesh;
pub mod faceres;
pub mod fusion;
pub mod geometry;
pub mod masks;
pub mod morphology;
pub mod mtcnn;
pub mod preprocess;
pub mod ranking;
pub mod resample;
pub mod runtime;
pub mod scrfd;
pub mod segment;
pub mod verified;

pub use align::{ARCFACE_TEMPLATE, Affine, Similarity, estimate_norm, norm_crop, warp_affine};
pub use arcface::{ArcFace, ArcFaceConfig};
pub use blazeface::{BlazeDetection, BlazeFace};
pub use detector::{Face, FaceDetector, FaceEmbedder, cosine_similarity, l2_normalize};
pub use error::FaceError;
pub use facemesh::{FaceMesh, FaceParser, FaceRegions, Mesh};
pub use faceres::FaceRes;
pub use mtcnn::{Mtcnn, MtcnnConfig};
pub use preprocess::{DecodeLimits, decode_rgb, load_rgb, load_rgb_with, to_nchw_signed};
pub use runtime::{Input, OnnxModel, environment};
pub use scrfd::{Scrfd, ScrfdConfig};
pub use segment::{HumanSelfie, Segmenter, U2Net};
pub use verified::VerifiedMtcnn;
