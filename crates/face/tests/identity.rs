//! The real identity embedder (Human's faceres) with the built-in MTCNN: augmented copies of a face
//! (mirror, brightness, rotation, tighter crop at another scale) are closer to it than the other
//! people in the same group photo. Needs ORT_DYLIB_PATH (see the crate docs).

mod reference;

use easyphoto_face::align::warp_affine;
use easyphoto_face::{Face, FaceDetector, FaceEmbedder, FaceError, FaceRes, Mtcnn, cosine_similarity};
use image::{RgbImage, imageops};
use reference::{asset, photo};

/// The region of `img` around `face`, `ratio` box sizes wide, clipped.
fn region(img: &RgbImage, face: &Face, ratio: f32) -> RgbImage {
    let (cx, cy) = ((face.bbox[0] + face.bbox[2]) / 2.0, (face.bbox[1] + face.bbox[3]) / 2.0);
    let half = face.width().max(face.height()) * ratio / 2.0;
    let x0 = (cx - half).max(0.0) as u32;
    let y0 = (cy - half).max(0.0) as u32;
    let x1 = ((cx + half) as u32).min(img.width());
    let y1 = ((cy + half) as u32).min(img.height());
    imageops::crop_imm(img, x0, y0, x1 - x0, y1 - y0).to_image()
}

fn augmentations(base: &RgbImage) -> Vec<(&'static str, RgbImage)> {
    let (w, h) = base.dimensions();
    let brighter = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb(base.get_pixel(x, y).0.map(|v| (f32::from(v) * 1.3).min(255.0) as u8))
    });
    let (angle, cx, cy) = (10f64.to_radians(), f64::from(w) / 2.0, f64::from(h) / 2.0);
    let (c, s) = (angle.cos(), angle.sin());
    let rotation = [[c, s, (1.0 - c) * cx - s * cy], [-s, c, s * cx + (1.0 - c) * cy]];
    let rotated = warp_affine(base, &rotation, w, h);
    let inner = imageops::crop_imm(base, w / 6, h / 6, w * 2 / 3, h * 2 / 3).to_image();
    let rescaled = imageops::resize(&inner, w * 2 / 3 * 4 / 5, h * 2 / 3 * 4 / 5, imageops::FilterType::Triangle);
    vec![
        ("mirrored", imageops::flip_horizontal(base)),
        ("brighter", brighter),
        ("rotated 10°", rotated),
        ("cropped, 0.8×", rescaled),
    ]
}

#[test]
fn augmented_copies_score_higher_than_other_people() -> anyhow::Result<()> {
    let mtcnn = Mtcnn::new(0)?;
    let faceres = FaceRes::load(asset("human_faceres.onnx"), 0)?;
    for file in ["faceapi_sample1.jpg", "faceapi_sample3.jpg"] {
        let img = photo(file)?;
        let faces = mtcnn.detect(&img)?;
        assert!(faces.len() >= 2, "{file}: {} faces", faces.len());
        let embeddings = faces.iter().map(|f| faceres.embed(&img, f)).collect::<Result<Vec<_>, _>>()?;
        for (i, face) in faces.iter().enumerate() {
            let others = embeddings
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, e)| cosine_similarity(&embeddings[i], e))
                .fold(f32::MIN, f32::max);
            let base = region(&img, face, 2.2);
            let mut worst_same = f32::MAX;
            for (name, aug) in augmentations(&base) {
                let found = mtcnn.detect_some(&aug, name)?;
                let emb = faceres.embed(&aug, &found[0])?;
                let sim = cosine_similarity(&embeddings[i], &emb);
                println!("{file} face {i}: {name} {sim:.3}");
                worst_same = worst_same.min(sim);
            }
            println!("{file} face {i}: same person ≥ {worst_same:.3}, other people ≤ {others:.3}");
            assert!(worst_same > others, "{file} face {i}: augmented {worst_same} <= other person {others}");
        }
    }
    Ok(())
}

#[test]
fn embeddings_are_unit_vectors_and_bad_models_are_typed_errors() -> anyhow::Result<()> {
    let faceres = FaceRes::load(asset("human_faceres.onnx"), 1)?;
    let img = photo("astronaut.png")?;
    let face = Mtcnn::new(1)?.detect_some(&img, "astronaut.png")?[0];
    let emb = faceres.embed(&img, &face)?;
    let norm = emb.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert_eq!(emb.len(), 1024);
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    assert!(matches!(FaceRes::load(asset("scrfd_random.onnx"), 1), Err(FaceError::UnsupportedModel { .. })));
    assert!(matches!(faceres.embed_aligned(&RgbImage::new(112, 112)), Err(FaceError::BadShape { .. })));
    Ok(())
}
