//! OpenPose body skeletons for the openpose unit.
//!
//! - [`body_model`]: the OpenPose body network of the WebUI annotator (`body_pose_model.pth`).
//! - [`decode`](mod@decode): heat maps and part affinity fields to people (controlnet_aux's decoding).
//! - [`estimate`]: the annotator's whole body estimation (scaling, network, map upsampling, decoding).
//! - [`draw`]: controlnet_aux's `draw_bodypose` (the picture the ControlNet sees).
//! - [`movenet`]: the download-free default estimator (MoveNet Lightning through ONNX Runtime),
//!   mapped to the 18 OpenPose keypoints.
//!
//! Hands and face (`openpose_full`'s hand and face estimators) are not implemented yet.

pub mod body_model;
pub mod decode;
pub mod draw;
pub mod estimate;
pub mod movenet;

pub use body_model::BodyPoseModel;
pub use decode::{Decoded, PoseMaps, decode};
pub use draw::draw_bodypose;
pub use estimate::{annotate_openpose, estimate_bodies, pose_maps};
pub use movenet::{MoveNet, coco_to_openpose};

/// One body keypoint with coordinates normalised to `[0, 1]` of the image width and height
/// (controlnet_aux's `Keypoint`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keypoint {
    /// Horizontal position, 0 at the left edge and 1 at the right edge.
    pub x: f64,
    /// Vertical position, 0 at the top and 1 at the bottom.
    pub y: f64,
    /// Detector confidence.
    pub score: f64,
}

/// The 18 OpenPose body parts, in OpenPose order (`None` where a part was not found).
pub type Body = [Option<Keypoint>; 18];
