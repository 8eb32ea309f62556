//! Alignment against insightface 2.1 (`utils/face_align.py`), scikit-image and OpenCV on the real
//! photos; fixture from `tools/reference/face_align.py`.

mod reference;

use easyphoto_face::align::{Similarity, estimate_norm, invert_affine, norm_crop, warp_affine};
use easyphoto_face::{Affine, FaceError};
use image::{GrayImage, imageops};
use reference::{Fixture, max_abs_diff_u8, photo};

const PHOTOS: [(&str, &str); 5] = [
    ("astronaut", "astronaut.png"),
    ("faceapi_sample1", "faceapi_sample1_640.png"),
    ("faceapi_sample2", "faceapi_sample2_640.png"),
    ("faceapi_sample3", "faceapi_sample3_640.png"),
    ("faceapi_sample4", "faceapi_sample4_640.png"),
];

fn faces(fx: &Fixture, key: &str) -> anyhow::Result<Vec<[[f32; 2]; 5]>> {
    let values = fx.f32s(&format!("{key}.landmarks"))?;
    Ok(values.chunks_exact(10).map(|c| std::array::from_fn(|i| [c[2 * i], c[2 * i + 1]])).collect())
}

fn matrix(values: &[f64]) -> Affine {
    [[values[0], values[1], values[2]], [values[3], values[4], values[5]]]
}

fn max_matrix_diff(a: &Affine, b: &Affine) -> f64 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn estimate_norm_matches_insightface() -> anyhow::Result<()> {
    let fx = Fixture::open("align.safetensors")?;
    let (mut worst32, mut worst64) = (0.0f64, 0.0f64);
    for (key, _) in PHOTOS {
        for size in [112, 128, 224] {
            let as_called = fx.get(&format!("{key}.norm_matrix_{size}"))?.1;
            let in_f64 = fx.get(&format!("{key}.norm_matrix64_{size}"))?.1;
            for (i, lmk) in faces(&fx, key)?.iter().enumerate() {
                let ours = estimate_norm(lmk, size)?.matrix();
                // insightface passes float32 landmarks and template, and scikit-image then solves in float32.
                let err32 = max_matrix_diff(&ours, &matrix(&as_called[i * 6..i * 6 + 6]));
                let err64 = max_matrix_diff(&ours, &matrix(&in_f64[i * 6..i * 6 + 6]));
                assert!(err32 < 1e-3, "{key} face {i} size {size}: matrix differs by {err32}");
                assert!(err64 < 1e-5, "{key} face {i} size {size}: float64 matrix differs by {err64}");
                worst32 = worst32.max(err32);
                worst64 = worst64.max(err64);
            }
        }
    }
    println!("estimate_norm: max abs matrix error {worst64:e} (float64), {worst32:e} (scikit-image's float32)");
    Ok(())
}

#[test]
fn norm_crop_matches_insightface_and_opencv() -> anyhow::Result<()> {
    let fx = Fixture::open("align.safetensors")?;
    let (mut worst, mut differing, mut total) = (0u8, 0usize, 0usize);
    for (key, file) in PHOTOS {
        let img = photo(file)?;
        let expected = fx.u8s(&format!("{key}.norm_crop_112"))?;
        for (i, lmk) in faces(&fx, key)?.iter().enumerate() {
            let crop = norm_crop(&img, lmk, 112)?;
            let (err, n) = max_abs_diff_u8(crop.as_raw(), &expected[i * 112 * 112 * 3..(i + 1) * 112 * 112 * 3]);
            assert!(err <= 1, "{key} face {i}: norm_crop differs by {err} levels");
            worst = worst.max(err);
            differing += n;
            total += crop.as_raw().len();
        }
    }
    println!("norm_crop: max abs error {worst} level(s), {differing} of {total} values differ");
    Ok(())
}

#[test]
fn warp_onto_another_face_matches_opencv() -> anyhow::Result<()> {
    let fx = Fixture::open("align.safetensors")?;
    for (key, file) in PHOTOS.iter().skip(1) {
        let img = photo(file)?;
        let lmks = faces(&fx, key)?;
        let transform = Similarity::estimate(&lmks[0], &lmks[1])?;
        let expected_m = matrix(&fx.get(&format!("{key}.pair_matrix"))?.1);
        let m_err = max_matrix_diff(&transform.matrix(), &expected_m);
        assert!(m_err < 1e-4, "{key}: similarity differs by {m_err}");

        let warped = warp_affine(&img, &expected_m, img.width(), img.height());
        let b = fx.get(&format!("{key}.pair_box"))?.1;
        let (x0, y0, x1, y1) = (b[0] as u32, b[1] as u32, b[2] as u32, b[3] as u32);
        let window = imageops::crop_imm(&warped, x0, y0, x1 - x0, y1 - y0).to_image();
        let (err, n) = max_abs_diff_u8(window.as_raw(), &fx.u8s(&format!("{key}.pair_window"))?);
        println!("{key}: matrix error {m_err:e}, window max abs error {err}, {n} values differ");
        assert!(err <= 1, "{key}: warp differs by {err} levels");
    }
    Ok(())
}

#[test]
fn grey_warp_with_border_matches_opencv() -> anyhow::Result<()> {
    let fx = Fixture::open("align.safetensors")?;
    let expected = fx.u8s("astronaut.grey_warp")?;
    let m = matrix(&fx.get("astronaut.grey_matrix")?.1);
    // The source is PIL's grey conversion of the photo, as the generator made it.
    let pil_grey = pil_luma(&photo("astronaut.png")?);
    let warped = warp_affine(&pil_grey, &m, 180, 200);
    let (err, n) = max_abs_diff_u8(warped.as_raw(), &expected);
    println!("grey warp: max abs error {err}, {n} values differ");
    assert!(err <= 1, "grey warp differs by {err} levels");
    assert!(warped.as_raw().iter().filter(|&&v| v == 0).count() > 1000, "expected a black border");
    Ok(())
}

/// PIL's `convert("L")`: `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
fn pil_luma(img: &image::RgbImage) -> GrayImage {
    GrayImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b] = img.get_pixel(x, y).0;
        image::Luma([((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8])
    })
}

#[test]
fn similarity_recovers_a_known_transform() -> anyhow::Result<()> {
    let truth = Similarity { a: 1.3 * 0.4f64.cos(), b: 1.3 * 0.4f64.sin(), tx: -7.5, ty: 21.0 };
    let src = [[10.0, 20.0], [50.0, 22.0], [31.0, 40.0], [15.0, 61.0], [47.0, 60.0]];
    let dst = src.map(|p| truth.apply(p));
    let est = Similarity::estimate(&src, &dst)?;
    assert!((est.scale() - 1.3).abs() < 1e-5 && (est.rotation() - 0.4).abs() < 1e-5, "{est:?}");
    let inv = invert_affine(&est.matrix());
    let back = [inv[0][0] * f64::from(dst[2][0]) + inv[0][1] * f64::from(dst[2][1]) + inv[0][2]];
    assert!((back[0] - 31.0).abs() < 1e-4);
    Ok(())
}

#[test]
fn degenerate_landmarks_are_typed_errors() {
    let same = [[5.0, 5.0]; 5];
    assert!(matches!(estimate_norm(&same, 112), Err(FaceError::DegenerateLandmarks { .. })));
    assert!(matches!(Similarity::estimate(&same[..2], &same[..3]), Err(FaceError::DegenerateLandmarks { .. })));
    let ok = [[38.0, 51.0], [73.0, 51.0], [56.0, 71.0], [41.0, 92.0], [70.0, 92.0]];
    assert!(matches!(estimate_norm(&ok, 100), Err(FaceError::DegenerateLandmarks { .. })));
}
