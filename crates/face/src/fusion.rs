//! Face fusion: the user's face put onto a template face, the step EasyPhoto runs before and after
//! diffusion (with ModelScope's DAMO fusion model, which cannot be had here).
//!
//! [`FaceFusion`] is the interface, so that a neural swapper (e.g. the inswapper ONNX model) can be
//! added; [`ClassicalFusion`] implements it without any model: the user's face is aligned onto
//! the template's by their five landmarks ([`Similarity`] + [`warp_affine`], as EasyPhoto's
//! `crop_and_paste`), colour-matched to the template ([`color_transfer`]), and blended through a
//! feathered face mask weighted by `ratio` (EasyPhoto's face fusion ratio).

use image::{GrayImage, Luma, RgbImage};

use crate::FaceError;
use crate::align::{Similarity, warp_affine};
use crate::color::color_transfer;
use crate::detector::Face;
use crate::geometry::crop;
use crate::masks::{blend, paste, same_size};
use crate::morphology::{Plane, box_blur, erode};

/// Puts the face of `user` (the face `user_face` in it) onto the face `template_face` of
/// `template`, returning an image of the template's size.
pub trait FaceFusion {
    /// Fuses one face; the template outside the face is left as it is.
    fn fuse(
        &self,
        template: &RgbImage,
        template_face: &Face,
        user: &RgbImage,
        user_face: &Face,
    ) -> Result<RgbImage, FaceError>;
}

/// Parameters of [`fuse_faces`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusionParams {
    /// The user's share inside the face, in `[0, 1]`: 0 returns the template, 1 the aligned user face
    /// where the feathered mask is full. EasyPhoto's WebUI uses 0.6 before and after diffusion.
    pub ratio: f32,
    /// Feathering radius `r` in pixels: the face mask is eroded by a `(2r+1)²` kernel, then
    /// box-blurred with the same size, so the blend fades out within the mask and never reaches
    /// past it (EasyPhoto blurs with 8). 0: a hard edge.
    pub feather: u32,
    /// Reinhard colour transfer of the aligned user face towards the template's face box.
    pub color_match: bool,
}

impl Default for FusionParams {
    fn default() -> Self {
        Self { ratio: 0.6, feather: 4, color_match: true }
    }
}

/// Classical (model-free) [`FaceFusion`]: [`fuse_faces`] through [`landmark_face_mask`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClassicalFusion {
    /// How to fuse.
    pub params: FusionParams,
}

impl FaceFusion for ClassicalFusion {
    fn fuse(
        &self,
        template: &RgbImage,
        template_face: &Face,
        user: &RgbImage,
        user_face: &Face,
    ) -> Result<RgbImage, FaceError> {
        let mask = landmark_face_mask(template.width(), template.height(), &template_face.landmarks);
        fuse_faces(template, &template_face.landmarks, user, &user_face.landmarks, &mask, &self.params)
    }
}

/// A face mask from five landmarks: the pixels (at integer coordinates) inside an ellipse centred
/// on the landmarks' mean, turned with the eye line, with semi-axes 1.0 × the eye distance across
/// and 1.3 × down (cheeks, brows to chin on a frontal face), as 0/255. A stand-in where no parsing
/// mask (skin, brows, eyes, nose, lips) is at hand.
pub fn landmark_face_mask(width: u32, height: u32, landmarks: &[[f32; 2]; 5]) -> GrayImage {
    let n = landmarks.len() as f64;
    let cx = landmarks.iter().map(|p| f64::from(p[0])).sum::<f64>() / n;
    let cy = landmarks.iter().map(|p| f64::from(p[1])).sum::<f64>() / n;
    let (ex, ey) = (f64::from(landmarks[1][0] - landmarks[0][0]), f64::from(landmarks[1][1] - landmarks[0][1]));
    let d = ex.hypot(ey);
    let (cos, sin) = if d > 0.0 { (ex / d, ey / d) } else { (1.0, 0.0) };
    let (a, b) = (d, 1.3 * d);
    GrayImage::from_fn(width, height, |x, y| {
        let (dx, dy) = (f64::from(x) - cx, f64::from(y) - cy);
        let (u, v) = (cos * dx + sin * dy, -sin * dx + cos * dy);
        Luma([if d > 0.0 && (u / a).powi(2) + (v / b).powi(2) <= 1.0 { 255 } else { 0 }])
    })
}

/// Classical face fusion into `mask` (0/255, the template's size):
///
/// 1. the similarity taking `user_landmarks` onto `template_landmarks` warps `user` to the
///    template's size (`cv2.warpAffine`, bilinear, black outside);
/// 2. the mask is cut to where the warped user image is fully defined;
/// 3. with `color_match`, the warped image's box around the mask is colour-transferred
///    ([`color_transfer`]) towards the template's same box;
/// 4. weights = `box_blur(erode(mask, k) · ratio, k) / 255` in f32 with `k = 2·feather + 1`, and
///    the result is `np.uint8(user · w + template · (1 − w))`.
///
/// Outside the mask (and wherever the weights are 0) the template is returned untouched. Errors if `ratio` is outside
/// `[0, 1]`, the mask's size differs from the template's, or the landmarks are degenerate.
pub fn fuse_faces(
    template: &RgbImage,
    template_landmarks: &[[f32; 2]; 5],
    user: &RgbImage,
    user_landmarks: &[[f32; 2]; 5],
    mask: &GrayImage,
    params: &FusionParams,
) -> Result<RgbImage, FaceError> {
    if !(0.0..=1.0).contains(&params.ratio) {
        return Err(FaceError::InvalidInput { what: format!("fuse_faces: ratio {} is outside [0, 1]", params.ratio) });
    }
    same_size("fuse_faces (template, mask)", template.dimensions(), mask.dimensions())?;
    let (w, h) = template.dimensions();
    let m = Similarity::estimate(user_landmarks, template_landmarks)?.matrix();
    let mut warped = warp_affine(user, &m, w, h);
    let coverage = warp_affine(&GrayImage::from_pixel(user.width(), user.height(), Luma([255])), &m, w, h);
    let region = GrayImage::from_fn(w, h, |x, y| {
        Luma([if mask[(x, y)][0] > 0 && coverage[(x, y)][0] == 255 { 255 } else { 0 }])
    });
    let Some(bx) = bounding_box(&region) else {
        return Ok(template.clone());
    };

    if params.color_match {
        let matched = color_transfer(&crop(&warped, bx), &crop(template, bx))?;
        paste(&mut warped, &matched, i64::from(bx[0]), i64::from(bx[1]));
    }

    let k = 2 * params.feather + 1;
    let eroded = erode(&region, k, k);
    let scaled = Plane::<f32>::from_fn(w, h, |x, y| Luma([f32::from(eroded[(x, y)][0]) * params.ratio]));
    let blurred = box_blur(&scaled, k, k)?;
    let weights = Plane::<f32>::from_fn(w, h, |x, y| Luma([blurred[(x, y)][0] / 255.0]));
    blend(&warped, template, &weights)
}

/// EasyPhoto's `crop_and_paste`, the "replaced image" that feeds the OpenPose ControlNet: the crop
/// `source_box` of `source` (and of `source_mask`) is warped onto `target` by the similarity taking
/// the source landmarks (in `source`'s coordinates) onto `target_landmarks`, and replaces the
/// target wherever the warped mask is non-zero (per channel, as EasyPhoto compares its
/// three-channel mask).
pub fn crop_and_paste(
    source: &RgbImage,
    source_mask: &GrayImage,
    target: &RgbImage,
    source_landmarks: &[[f32; 2]; 5],
    target_landmarks: &[[f32; 2]; 5],
    source_box: [i32; 4],
) -> Result<RgbImage, FaceError> {
    same_size("crop_and_paste (source, source_mask)", source.dimensions(), source_mask.dimensions())?;
    let (x0, y0) = (source_box[0] as f32, source_box[1] as f32);
    let relative = source_landmarks.map(|[x, y]| [x - x0, y - y0]);
    let m = Similarity::estimate(&relative, target_landmarks)?.matrix();
    let (w, h) = target.dimensions();
    let warped = warp_affine(&crop(source, source_box), &m, w, h);
    let warped_mask = warp_affine(&crop(source_mask, source_box), &m, w, h);
    let mut out = target.clone();
    for ((o, p), mk) in out.pixels_mut().zip(warped.pixels()).zip(warped_mask.pixels()) {
        if mk[0] != 0 {
            *o = *p;
        }
    }
    Ok(out)
}

/// Region masks (0/255, from face parsing: BiSeNet in EasyPhoto) that [`fusion_blend`] reads.
#[derive(Debug, Clone, Copy)]
pub struct FusionRegions<'a> {
    /// Skin, brows, eyes, nose, mouth and lips of the fusion result.
    pub fusion_face: &'a GrayImage,
    /// The same regions of the input (template) image.
    pub input_face: &'a GrayImage,
    /// The eyes of the fusion result.
    pub fusion_eyes: &'a GrayImage,
    /// The lips of the input image.
    pub input_lips: &'a GrayImage,
}

/// The blend weights of EasyPhoto's face fusion (WebUI, PR #345), in f64 as numpy computes them:
/// the intersection of both face masks, `erode16(dilate8(·)) · ratio`, set to 1 on the fusion's
/// eyes dilated by 16 (eyes wholly from the fusion) and to 0 on the input's lips (lips kept),
/// then `box_blur(·, 8) / 255`.
pub fn fusion_blend_weights(regions: &FusionRegions<'_>, ratio: f64) -> Result<Plane<f64>, FaceError> {
    let FusionRegions { fusion_face, input_face, fusion_eyes, input_lips } = *regions;
    let size = fusion_face.dimensions();
    for (what, mask) in [("input_face", input_face), ("fusion_eyes", fusion_eyes), ("input_lips", input_lips)] {
        same_size(&format!("fusion_blend_weights (fusion_face, {what})"), size, mask.dimensions())?;
    }
    let both = GrayImage::from_fn(size.0, size.1, |x, y| {
        Luma([if fusion_face[(x, y)][0] > 128 && input_face[(x, y)][0] > 128 { 255 } else { 0 }])
    });
    let core = erode(&crate::morphology::dilate(&both, 8, 8), 16, 16);
    let eyes = crate::morphology::dilate(fusion_eyes, 16, 16);
    let combined = Plane::<f64>::from_fn(size.0, size.1, |x, y| {
        let v = if input_lips[(x, y)][0] > 128 {
            0.0
        } else if eyes[(x, y)][0] > 128 {
            255.0
        } else {
            f64::from(core[(x, y)][0]) * ratio
        };
        Luma([v])
    });
    let blurred = box_blur(&combined, 8, 8)?;
    Ok(Plane::from_fn(size.0, size.1, |x, y| Luma([blurred[(x, y)][0] / 255.0])))
}

/// EasyPhoto's blend of a fusion result into the input image (`apply_face_fusion_before` /
/// `_after`): `np.uint8(fusion · w + input · (1 − w))` with [`fusion_blend_weights`]. `ratio` is
/// the before/after face fusion ratio (0.6 in the WebUI).
pub fn fusion_blend(
    fusion: &RgbImage,
    input: &RgbImage,
    regions: &FusionRegions<'_>,
    ratio: f64,
) -> Result<RgbImage, FaceError> {
    blend(fusion, input, &fusion_blend_weights(regions, ratio)?)
}

/// `[x1, y1, x2, y2]` (far edges excluded) of the non-zero pixels, `None` if there are none.
fn bounding_box(mask: &GrayImage) -> Option<[i32; 4]> {
    let mut bx: Option<[i32; 4]> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] > 0 {
            let (x, y) = (x as i32, y as i32);
            bx = Some(match bx {
                None => [x, y, x + 1, y + 1],
                Some([x1, y1, x2, y2]) => [x1.min(x), y1.min(y), x2.max(x + 1), y2.max(y + 1)],
            });
        }
    }
    bx
}
