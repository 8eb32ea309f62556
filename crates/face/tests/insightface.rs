//! SCRFD and ArcFace against insightface 2.1's own `model_zoo/scrfd.py`, `arcface_onnx.py` and
//! `utils/face_align.py`, on seeded random models with the signatures of buffalo_l's
//! `det_10g.onnx` and `w600k_r50.onnx` and the real photos. Fixtures from
//! `tools/reference/face_insightface.py`. Needs ORT_DYLIB_PATH (see the crate docs).

mod reference;

use easyphoto_face::{ArcFace, Face, FaceDetector, FaceEmbedder, FaceError, Scrfd, ScrfdConfig};
use reference::{Fixture, asset, photo};

const PHOTOS: [(&str, &str); 5] = [
    ("astronaut", "astronaut.png"),
    ("faceapi_sample1", "faceapi_sample1_640.png"),
    ("faceapi_sample2", "faceapi_sample2_640.png"),
    ("faceapi_sample3", "faceapi_sample3_640.png"),
    ("faceapi_sample4", "faceapi_sample4_640.png"),
];

#[test]
fn scrfd_matches_insightface() -> anyhow::Result<()> {
    let fx = Fixture::open("insightface.safetensors")?;
    let mut scrfd = Scrfd::load(asset("scrfd_random.onnx"), 1)?;
    let mut failures = Vec::new();
    for (key, file) in PHOTOS {
        let img = photo(file)?;
        for size in [640u32, 480] {
            let name = format!("{key}.{size}");
            if !fx.has(&format!("{name}.boxes")) {
                continue;
            }
            scrfd.set_config(ScrfdConfig { det_size: (size, size), ..ScrfdConfig::default() });
            let faces = scrfd.detect(&img)?;
            let (shape, boxes) = fx.get(&format!("{name}.boxes"))?;
            let kps = fx.f32s(&format!("{name}.kps"))?;
            assert_eq!(faces.len(), shape[0], "{name}: {} detections, insightface {}", faces.len(), shape[0]);
            let (mut box_err, mut kps_err, mut score_err) = (0.0f32, 0.0f32, 0.0f32);
            for (i, f) in faces.iter().enumerate() {
                for j in 0..4 {
                    box_err = box_err.max((f.bbox[j] - boxes[i * 5 + j] as f32).abs());
                }
                score_err = score_err.max((f.score - boxes[i * 5 + 4] as f32).abs());
                for (p, [x, y]) in f.landmarks.iter().enumerate() {
                    kps_err = kps_err.max((x - kps[i * 10 + 2 * p]).abs()).max((y - kps[i * 10 + 2 * p + 1]).abs());
                }
            }
            println!(
                "{name}: {} faces; max abs error boxes {box_err:e}, keypoints {kps_err:e}, scores {score_err:e}",
                faces.len()
            );
            if !(box_err <= 1e-4 && kps_err <= 1e-4 && score_err <= 1e-6) {
                failures.push(name);
            }
        }
    }
    assert!(failures.is_empty(), "differ from insightface: {failures:?}");
    Ok(())
}

#[test]
fn arcface_matches_insightface() -> anyhow::Result<()> {
    let fx = Fixture::open("insightface.safetensors")?;
    let align = Fixture::open("align.safetensors")?;
    let arcface = ArcFace::load(asset("arcface_random.onnx"), 1)?;
    assert_eq!(arcface.input_size(), 112);
    let mut worst = 0.0f32;
    for (key, file) in PHOTOS {
        let img = photo(file)?;
        let expected = fx.f32s(&format!("{key}.embeddings"))?;
        let lmks = align.f32s(&format!("{key}.landmarks"))?;
        let faces: Vec<Face> = lmks
            .chunks_exact(10)
            .map(|l| Face { bbox: [0.0; 4], score: 1.0, landmarks: std::array::from_fn(|p| [l[2 * p], l[2 * p + 1]]) })
            .collect();
        // One batched run for all faces, and the single-crop path for the first.
        let batched = arcface.embed_all(&img, &faces)?;
        assert_eq!(batched.len(), faces.len());
        let single = arcface.embed(&img, &faces[0])?;
        assert!(reference::max_abs_diff(&single, &batched[0]) <= 1e-6, "{key}: batched and single runs differ");
        for (i, emb) in batched.iter().enumerate() {
            assert_eq!(emb.len(), 512);
            let err = reference::max_abs_diff(emb, &expected[i * 512..(i + 1) * 512]);
            worst = worst.max(err);
            assert!(err <= 1e-4, "{key} face {i}: embedding differs by {err}");
        }
    }
    println!("arcface: max abs error of normalised embeddings {worst:e}");
    Ok(())
}

#[test]
fn wrong_models_are_typed_errors() -> anyhow::Result<()> {
    // The ArcFace model is no SCRFD (one output), and SCRFD is no recogniser (dynamic input).
    assert!(matches!(Scrfd::load(asset("arcface_random.onnx"), 1), Err(FaceError::UnsupportedModel { .. })));
    assert!(matches!(ArcFace::load(asset("scrfd_random.onnx"), 1), Err(FaceError::UnsupportedModel { .. })));
    let arcface = ArcFace::load(asset("arcface_random.onnx"), 1)?;
    let wrong = image::RgbImage::new(100, 100);
    assert!(matches!(arcface.embed_aligned(&wrong), Err(FaceError::BadShape { .. })));
    Ok(())
}
