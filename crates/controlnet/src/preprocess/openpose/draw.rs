//! The OpenPose skeleton picture of controlnet_aux (`draw_bodypose`), pixel for pixel.
//!
//! Limbs are ellipses (`cv2.ellipse2Poly`, 1° steps, OpenCV's 7-digit sine table) filled with
//! `cv2.fillConvexPoly` at 60% of the limb colour; joints are filled `cv2.circle`s of radius 4. All
//! three are re-implemented here with OpenCV's integer rasterisation (8-connected outlines, 16-bit
//! fixed-point scanlines, midpoint circles).

use std::sync::OnceLock;

use image::{Rgb, RgbImage};

use super::Body;

/// The 17 limbs drawn, as pairs of OpenPose-18 indices (0-based: 0 nose, 1 neck, 2–4 right arm,
/// 5–7 left arm, 8–10 right leg, 11–13 left leg, 14/15 eyes, 16/17 ears).
pub const LIMBS: [(usize, usize); 17] = [
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
];

/// The colour of each limb and of each keypoint (RGB).
pub const COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// Half the width of a limb, in pixels.
const STICK_WIDTH: i32 = 4;
/// Radius of a joint, in pixels.
const JOINT_RADIUS: i32 = 4;

/// controlnet_aux `draw_bodypose`: draws one body (OpenPose-18 keypoints with coordinates normalised
/// to `[0, 1]` of the canvas, `None` for missing parts) onto `canvas`.
pub fn draw_bodypose(canvas: &mut RgbImage, keypoints: &Body) {
    let (w, h) = (f64::from(canvas.width()), f64::from(canvas.height()));
    for (&(a, b), color) in LIMBS.iter().zip(COLORS) {
        let (Some(k1), Some(k2)) = (keypoints[a], keypoints[b]) else { continue };
        let (x1, x2) = (k1.x * w, k2.x * w);
        let (y1, y2) = (k1.y * h, k2.y * h);
        let (mx, my) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
        let length = ((y1 - y2).powi(2) + (x1 - x2).powi(2)).sqrt();
        let angle = (y1 - y2).atan2(x1 - x2).to_degrees();
        let polygon = ellipse_to_polygon((mx as i32, my as i32), ((length / 2.0) as i32, STICK_WIDTH), angle as i32);
        let dim = color.map(|c| (f64::from(c) * 0.6) as u8);
        fill_convex_polygon(canvas, &polygon, Rgb(dim));
    }
    for (keypoint, color) in keypoints.iter().zip(COLORS) {
        if let Some(k) = keypoint {
            fill_circle(canvas, ((k.x * w) as i32, (k.y * h) as i32), JOINT_RADIUS, Rgb(color));
        }
    }
}

/// OpenCV's `SinTable`: sin of 0..=450 degrees, as the 7-decimal float literals of `drawing.cpp`.
fn sin_table() -> &'static [f32; 451] {
    static TABLE: OnceLock<[f32; 451]> = OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|deg| {
            let s = (deg as f64).to_radians().sin();
            format!("{s:.7}").parse().expect("a formatted float parses")
        })
    })
}

/// `cv2.ellipse2Poly(center, axes, angle, 0, 360, 1)`: the outline of a full ellipse rotated by
/// `angle` degrees, one vertex per degree, consecutive duplicates removed.
pub fn ellipse_to_polygon(center: (i32, i32), axes: (i32, i32), angle: i32) -> Vec<(i32, i32)> {
    let table = sin_table();
    let angle = angle.rem_euclid(360) as usize;
    let (cos, sin) = (f64::from(table[450 - angle]), f64::from(table[angle]));
    let (cx, cy) = (f64::from(center.0), f64::from(center.1));
    let mut points: Vec<(i32, i32)> = Vec::with_capacity(361);
    for deg in 0..=360usize {
        let x = f64::from(axes.0) * f64::from(table[450 - deg]);
        let y = f64::from(axes.1) * f64::from(table[deg]);
        let p = ((cx + x * cos - y * sin).round_ties_even() as i32, (cy + x * sin + y * cos).round_ties_even() as i32);
        if points.last() != Some(&p) {
            points.push(p);
        }
    }
    if points.len() == 1 {
        points = vec![center, center];
    }
    points
}

/// Fixed-point shift of the scanline fill (OpenCV's `XY_SHIFT`).
const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

/// Sets pixels `x1..=x2` of row `y`; the caller clips.
fn hline(canvas: &mut RgbImage, y: i64, x1: i64, x2: i64, color: Rgb<u8>) {
    for x in x1..=x2 {
        canvas.put_pixel(x as u32, y as u32, color);
    }
}

/// `cv2.fillConvexPoly(canvas, points, color)` (8-connected outline, no sub-pixel shift).
pub fn fill_convex_polygon(canvas: &mut RgbImage, points: &[(i32, i32)], color: Rgb<u8>) {
    let n = points.len();
    if n == 0 {
        return;
    }
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let v: Vec<(i64, i64)> = points.iter().map(|&(x, y)| (i64::from(x), i64::from(y))).collect();
    let mut prev = v[n - 1];
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
    let mut imin = 0;
    for (i, &p) in v.iter().enumerate() {
        if p.1 < ymin {
            ymin = p.1;
            imin = i;
        }
        ymax = ymax.max(p.1);
        xmax = xmax.max(p.0);
        xmin = xmin.min(p.0);
        draw_line(canvas, prev, p, color);
        prev = p;
    }
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= width || ymin >= height {
        return;
    }
    let ymax = ymax.min(height - 1);

    #[derive(Clone, Copy)]
    struct Edge {
        idx: usize,
        di: usize,
        x: i64,
        dx: i64,
        ye: i64,
    }
    let mut edges = [
        Edge { idx: imin, di: 1, x: -XY_ONE, dx: 0, ye: ymin },
        Edge { idx: imin, di: n - 1, x: -XY_ONE, dx: 0, ye: ymin },
    ];
    let mut remaining = n as i64;
    let mut y = ymin;
    loop {
        for edge in &mut edges {
            if y < edge.ye {
                continue;
            }
            let mut idx0 = edge.idx;
            let mut idx = (idx0 + edge.di) % n;
            loop {
                remaining -= 1;
                if remaining < 0 {
                    break;
                }
                let ty = v[idx].1;
                if ty > y {
                    let (xs, xe) = (v[idx0].0 << XY_SHIFT, v[idx].0 << XY_SHIFT);
                    edge.ye = ty;
                    edge.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                    edge.x = xs;
                    edge.idx = idx;
                    break;
                }
                idx0 = idx;
                idx = (idx + edge.di) % n;
            }
        }
        if remaining < 0 {
            break;
        }
        if y >= 0 {
            let (left, right) = if edges[0].x > edges[1].x { (1, 0) } else { (0, 1) };
            let x1 = (edges[left].x + (XY_ONE >> 1)) >> XY_SHIFT;
            let x2 = (edges[right].x + (XY_ONE >> 1)) >> XY_SHIFT;
            if x2 >= 0 && x1 < width {
                hline(canvas, y, x1.max(0), x2.min(width - 1), color);
            }
        }
        edges[0].x += edges[0].dx;
        edges[1].x += edges[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// OpenCV's `clipLine`: clips the segment to the image; false when it lies outside.
fn clip_line(width: i64, height: i64, p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
    let (right, bottom) = (width - 1, height - 1);
    let code = |p: (i64, i64)| {
        i32::from(p.0 < 0) + i32::from(p.0 > right) * 2 + i32::from(p.1 < 0) * 4 + i32::from(p.1 > bottom) * 8
    };
    let (mut c1, mut c2) = (code(*p1), code(*p2));
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            p1.0 += ((a - p1.1) as f64 * (p2.0 - p1.0) as f64 / (p2.1 - p1.1) as f64) as i64;
            p1.1 = a;
            c1 = i32::from(p1.0 < 0) + i32::from(p1.0 > right) * 2;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            p2.0 += ((a - p2.1) as f64 * (p2.0 - p1.0) as f64 / (p2.1 - p1.1) as f64) as i64;
            p2.1 = a;
            c2 = i32::from(p2.0 < 0) + i32::from(p2.0 > right) * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                p1.1 += ((a - p1.0) as f64 * (p2.1 - p1.1) as f64 / (p2.0 - p1.0) as f64) as i64;
                p1.0 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                p2.1 += ((a - p2.0) as f64 * (p2.1 - p1.1) as f64 / (p2.0 - p1.0) as f64) as i64;
                p2.0 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// An 8-connected Bresenham segment as OpenCV's `LineIterator` walks it (left to right).
fn draw_line(canvas: &mut RgbImage, p1: (i64, i64), p2: (i64, i64), color: Rgb<u8>) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let (mut p1, mut p2) = (p1, p2);
    let outside = |p: (i64, i64)| p.0 < 0 || p.0 >= width || p.1 < 0 || p.1 >= height;
    if (outside(p1) || outside(p2)) && !clip_line(width, height, &mut p1, &mut p2) {
        return;
    }
    if p2.0 < p1.0 {
        std::mem::swap(&mut p1, &mut p2);
    }
    let (dx, dy) = (p2.0 - p1.0, (p2.1 - p1.1).abs());
    let step_y = if p2.1 < p1.1 { -1 } else { 1 };
    // The major axis steps every pixel; the minor one when the error was negative.
    let (major, minor, d_major, d_minor) =
        if dy > dx { ((0, step_y), (1, 0), dy, dx) } else { ((1, 0), (0, step_y), dx, dy) };
    let mut err = d_major - 2 * d_minor;
    let mut p = p1;
    for _ in 0..=d_major {
        canvas.put_pixel(p.0 as u32, p.1 as u32, color);
        let negative = err < 0;
        err -= 2 * d_minor;
        p = (p.0 + major.0, p.1 + major.1);
        if negative {
            err += 2 * d_major;
            p = (p.0 + minor.0, p.1 + minor.1);
        }
    }
}

/// `cv2.circle(canvas, center, radius, color, thickness=-1)`: a filled midpoint circle.
pub fn fill_circle(canvas: &mut RgbImage, center: (i32, i32), radius: i32, color: Rgb<u8>) {
    let (width, height) = (i64::from(canvas.width()), i64::from(canvas.height()));
    let (cx, cy) = (i64::from(center.0), i64::from(center.1));
    let (mut err, mut dx, mut dy, mut plus, mut minus) =
        (0i64, i64::from(radius), 0i64, 1i64, 2 * i64::from(radius) - 1);
    let span = |canvas: &mut RgbImage, y: i64, x1: i64, x2: i64| {
        if (0..height).contains(&y) && x1 < width && x2 >= 0 {
            hline(canvas, y, x1.max(0), x2.min(width - 1), color);
        }
    };
    while dx >= dy {
        span(canvas, cy - dy, cx - dx, cx + dx);
        span(canvas, cy + dy, cx - dx, cx + dx);
        span(canvas, cy - dx, cx - dy, cx + dy);
        span(canvas, cy + dx, cx - dy, cx + dy);
        dy += 1;
        err += plus;
        plus += 2;
        if err > 0 {
            err -= minus;
            dx -= 1;
            minus -= 2;
        }
    }
}
