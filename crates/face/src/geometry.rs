//! EasyPhoto's face-box rules, reproduced with its integer casts and clipping.
//!
//! Boxes are `[x1, y1, x2, y2]` in pixels. EasyPhoto keeps expanded boxes as `int32` arrays and crops
//! with PIL (`image.crop(box)`: columns `x1..x2`, rows `y1..y2`, the far edge excluded).

use image::{GenericImageView, ImageBuffer, Pixel};

/// `safe_get_box_mask_keypoints`: grows a detection box by `ratio` around its centre and clips it
/// to the image, with EasyPhoto's casts.
///
/// Each side moves by `(ratio - 1) / 2` of the box's width or height, measured from the side
/// truncated towards zero (`np.array(x, np.int32)`); the result is clipped to `[0, width - 1]` /
/// `[0, height - 1]` and truncated to an integer. `ratio` 1 only truncates and clips. EasyPhoto uses
/// 3 to crop training photos and templates, 1.5 for the user's face, 1.1 for the colour-shift box.
pub fn expand_box(detection: [f64; 4], ratio: f64, width: u32, height: u32) -> [i32; 4] {
    let [x1, y1, x2, y2] = detection;
    let grow = (ratio - 1.0) / 2.0;
    let (dw, dh) = ((x2 - x1) * grow, (y2 - y1) * grow);
    let (xmax, ymax) = (f64::from(width) - 1.0, f64::from(height) - 1.0);
    let side = |v: f64, delta: f64, max: f64| clip(f64::from(v as i32) + delta, 0.0, max) as i32;
    [side(x1, -dw, xmax), side(y1, -dh, ymax), side(x2, dw, xmax), side(y2, dh, ymax)]
}

/// The order in which EasyPhoto numbers the faces of an image: by the expanded box's `x1`, left
/// to right (ties keep detection order, as numpy's `argsort` does for the few faces of a photo).
pub fn left_to_right(boxes: &[[i32; 4]]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by_key(|&i| boxes[i][0]);
    order
}

/// The roll score of `preprocess.py`: `(90 - |atan(dy / dx)|°) / 90` over the two eyes (landmarks 0
/// and 1); 1 for level eyes, 0 for eyes one above the other. `dx`, `dy` and their ratio are
/// computed in f32 as EasyPhoto does on its float32 keypoints; `dx == 0` scores 1.
pub fn roll_score(landmarks: &[[f32; 2]; 5]) -> f64 {
    let dx = landmarks[0][0] - landmarks[1][0];
    let dy = landmarks[0][1] - landmarks[1][1];
    let angle = if dx == 0.0 { 0.0 } else { (f64::from(dy / dx).atan() * 180.0 / std::f64::consts::PI).abs() };
    (90.0 - angle) / 90.0
}

/// The box of the training mask (`preprocess.py`): a face box at ratio 1 widened by 30% of its
/// width on each side and moved down by 15% of its height (cutting the forehead, keeping the chin),
/// each side truncated and clipped to `[1, width - 1]` / `[1, height - 1]`.
pub fn training_box(face: [i32; 4], width: u32, height: u32) -> [i32; 4] {
    let [x1, y1, x2, y2] = face;
    let (fw, fh) = (f64::from(x2 - x1), f64::from(y2 - y1));
    let side = |v: i32, delta: f64, max: u32| clip(f64::from(v) + delta, 1.0, f64::from(max) - 1.0) as i32;
    [side(x1, -0.3 * fw, width), side(y1, 0.15 * fh, height), side(x2, 0.3 * fw, width), side(y2, 0.15 * fh, height)]
}

/// `np.clip(v, lo, hi)`: `min(max(v, lo), hi)`, so `hi` wins when `lo > hi` (a 1-pixel image).
fn clip(v: f64, lo: f64, hi: f64) -> f64 {
    v.max(lo).min(hi)
}

/// `image.crop(box)` for a box inside the image (as every box from [`expand_box`] is): columns
/// `x1..x2` and rows `y1..y2`. Parts of the box outside the image come out black, as in PIL.
pub fn crop<I>(image: &I, bx: [i32; 4]) -> ImageBuffer<I::Pixel, Vec<<I::Pixel as Pixel>::Subpixel>>
where
    I: GenericImageView,
{
    let [x1, y1, x2, y2] = bx;
    let (w, h) = ((x2 - x1).max(0) as u32, (y2 - y1).max(0) as u32);
    let mut out = ImageBuffer::new(w, h);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let (sx, sy) = (i64::from(x1) + i64::from(x), i64::from(y1) + i64::from(y));
        if sx >= 0 && sy >= 0 && sx < i64::from(image.width()) && sy < i64::from(image.height()) {
            *px = image.get_pixel(sx as u32, sy as u32);
        }
    }
    out
}
