//! Region masks and compositing: EasyPhoto's box masks, the training mask, blending through a
//! feathered mask, and pasting a crop back.
//!
//! Masks are one-channel [`Plane`]s: `u8` with 0/255 for hard masks (what EasyPhoto thresholds and
//! dilates), `f32` in `[0, 1]` for blend weights (`cv2.blur(mask, k) / 255`).

use image::{GrayImage, Luma, Primitive, RgbImage};

use crate::FaceError;
use crate::morphology::{Plane, close, dilate, erode};

/// A `width × height` mask that is 255 inside `bx` (`mask[y1:y2, x1:x2] = 255`, clipped to the
/// image) and 0 elsewhere: EasyPhoto's box mask.
pub fn box_mask(width: u32, height: u32, bx: [i32; 4]) -> GrayImage {
    let [x1, y1, x2, y2] = bx.map(|v| v.max(0) as u32);
    GrayImage::from_fn(width, height, |x, y| Luma([if x >= x1 && x < x2 && y >= y1 && y < y2 { 255 } else { 0 }]))
}

/// The training mask of `preprocess.py`: salient pixels (`saliency > 128`) inside the training box
/// ([`training_box`](crate::geometry::training_box) of the ratio-1 face box `face`), as 0/255.
pub fn training_mask(saliency: &GrayImage, face: [i32; 4]) -> GrayImage {
    let (w, h) = saliency.dimensions();
    let bx = box_mask(w, h, crate::geometry::training_box(face, w, h));
    GrayImage::from_fn(w, h, |x, y| Luma([if saliency[(x, y)][0] > 128 { bx[(x, y)][0] } else { 0 }]))
}

/// `crop × mask + 255 × (1 − mask)` for a 0/255 mask: the crop on a white background, as EasyPhoto
/// writes training images. `None` when the mask is empty (EasyPhoto drops such a photo).
pub fn on_white(crop: &RgbImage, mask: &GrayImage) -> Result<Option<RgbImage>, FaceError> {
    same_size("on_white", crop.dimensions(), mask.dimensions())?;
    if mask.pixels().all(|p| p[0] == 0) {
        return Ok(None);
    }
    let mut out = crop.clone();
    for (px, m) in out.pixels_mut().zip(mask.pixels()) {
        if m[0] == 0 {
            px.0 = [255; 3];
        }
    }
    Ok(Some(out))
}

/// A 0/255 `u8` mask as blend weights in `[0, 1]` (`mask / 255` in f32).
pub fn weights(mask: &GrayImage) -> Plane<f32> {
    Plane::from_fn(mask.width(), mask.height(), |x, y| Luma([f32::from(mask[(x, y)][0]) / 255.0]))
}

/// A blend weight type; [`blend`] computes in it, as numpy computes in the mask's dtype (EasyPhoto
/// blends through float32 masks for the colour shift and float64 ones for face fusion).
pub trait Weight: Primitive {
    /// `fg · m + bg · (1 − m)` in this type, truncated to u8 (`np.uint8`).
    fn mix(fg: u8, bg: u8, m: Self) -> u8;
}

impl Weight for f32 {
    fn mix(fg: u8, bg: u8, m: Self) -> u8 {
        (f32::from(fg) * m + f32::from(bg) * (1.0 - m)) as u8
    }
}

impl Weight for f64 {
    fn mix(fg: u8, bg: u8, m: Self) -> u8 {
        (f64::from(fg) * m + f64::from(bg) * (1.0 - m)) as u8
    }
}

/// `np.uint8(fg × m + bg × (1 − m))` with weights `m` in `[0, 1]`: EasyPhoto's composite through a
/// blurred mask, truncated to u8.
pub fn blend<W: Weight>(fg: &RgbImage, bg: &RgbImage, mask: &Plane<W>) -> Result<RgbImage, FaceError> {
    same_size("blend (fg, bg)", fg.dimensions(), bg.dimensions())?;
    same_size("blend (fg, mask)", fg.dimensions(), mask.dimensions())?;
    let mut out = bg.clone();
    for ((o, f), m) in out.pixels_mut().zip(fg.pixels()).zip(mask.pixels()) {
        for c in 0..3 {
            o.0[c] = W::mix(f.0[c], o.0[c], m[0]);
        }
    }
    Ok(out)
}

/// EasyPhoto's first-diffusion inpaint mask (`input_mask_face_part_only`): the face-region mask
/// closed, then dilated, with a `face_width / 10` square kernel (`face_width` of the face box;
/// under 10 pixels OpenCV's empty kernel means 3 × 3).
pub fn inpaint_face_mask(face: &GrayImage, face_width: u32) -> GrayImage {
    let k = face_width / 10;
    dilate(&close(face, k, k), k, k)
}

/// EasyPhoto's second-diffusion mask (`need_mouth_fix`): a ring around the face outline,
/// `dilate32(face) − erode16(face)`, plus `eyes_lips` (its eyes and lips regions), clipped to 255.
pub fn contour_mask(face: &GrayImage, eyes_lips: &GrayImage) -> Result<GrayImage, FaceError> {
    same_size("contour_mask", face.dimensions(), eyes_lips.dimensions())?;
    let (outer, inner) = (dilate(face, 32, 32), erode(face, 16, 16));
    Ok(GrayImage::from_fn(face.width(), face.height(), |x, y| {
        let ring = outer[(x, y)][0] - inner[(x, y)][0];
        Luma([ring.saturating_add(eyes_lips[(x, y)][0])])
    }))
}

/// Pastes `crop` into `dst` with its top-left corner at `(x, y)` (`dst[y:y+h, x:x+w] = crop`), the
/// hard paste-back of EasyPhoto's face crop; parts outside `dst` are skipped.
pub fn paste(dst: &mut RgbImage, crop: &RgbImage, x: i64, y: i64) {
    for (cx, cy, px) in crop.enumerate_pixels() {
        let (tx, ty) = (x + i64::from(cx), y + i64::from(cy));
        if tx >= 0 && ty >= 0 && tx < i64::from(dst.width()) && ty < i64::from(dst.height()) {
            dst.put_pixel(tx as u32, ty as u32, *px);
        }
    }
}

pub(crate) fn same_size(what: &str, a: (u32, u32), b: (u32, u32)) -> Result<(), FaceError> {
    if a == b {
        Ok(())
    } else {
        Err(FaceError::InvalidInput { what: format!("{what}: sizes {}x{} and {}x{} differ", a.0, a.1, b.0, b.1) })
    }
}
