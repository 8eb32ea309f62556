//! Region masks and compositing: EasyPhoto's box masks, the training mask, blending through a
//! feathered mask, and pasting a crop back.
//!
//! Masks are one-channel [`Plane`]s: `u8` with 0/255 for hard masks (what EasyPhoto thresholds and
//! dilates), `f32` in `[0, 1]` for blend weights (`cv2.blur(mask, k) / 255`).

use image::{GrayImage, Luma, RgbImage};

use crate::FaceError;
use crate::morphology::Plane;

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

/// `np.uint8(fg × m + bg × (1 − m))` with f32 weights `m`: EasyPhoto's composite through a blurred
/// mask, computed in f32 as numpy does for a float32 mask and truncated to u8.
pub fn blend(fg: &RgbImage, bg: &RgbImage, mask: &Plane<f32>) -> Result<RgbImage, FaceError> {
    same_size("blend (fg, bg)", fg.dimensions(), bg.dimensions())?;
    same_size("blend (fg, mask)", fg.dimensions(), mask.dimensions())?;
    let mut out = bg.clone();
    for ((o, f), m) in out.pixels_mut().zip(fg.pixels()).zip(mask.pixels()) {
        let m = m[0];
        for c in 0..3 {
            o.0[c] = (f32::from(f.0[c]) * m + f32::from(o.0[c]) * (1.0 - m)) as u8;
        }
    }
    Ok(out)
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
