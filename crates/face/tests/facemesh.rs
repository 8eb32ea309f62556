//! BlazeFace and FaceMesh region masks on a real photo, checked against the built-in MTCNN's
//! landmarks. Needs ORT_DYLIB_PATH (see the crate docs).

mod reference;

use easyphoto_face::{BlazeFace, FaceDetector, FaceMesh, FaceParser, Mtcnn};
use image::GrayImage;
use reference::{mediapipe, photo};

fn dist(a: [f32; 2], b: [f32; 2]) -> f32 {
    (a[0] - b[0]).hypot(a[1] - b[1])
}

fn inside(mask: &GrayImage, [x, y]: [f32; 2]) -> bool {
    mask.get_pixel(x.round() as u32, y.round() as u32)[0] == 255
}

fn area(mask: &GrayImage) -> usize {
    mask.iter().filter(|&&v| v > 0).count()
}

#[test]
fn blazeface_finds_the_astronaut_where_mtcnn_does() -> anyhow::Result<()> {
    let img = photo("astronaut.png")?;
    let faces = BlazeFace::load(mediapipe("face_detection_short_range.onnx"), 1)?.detect(&img)?;
    let reference = Mtcnn::new(1)?.detect_some(&img, "astronaut.png")?[0];
    assert_eq!(faces.len(), 1, "{faces:?}");
    let f = faces[0];
    println!("blazeface: box {:?} score {:.3}, keypoints {:?}", f.bbox, f.score, f.keypoints);
    let (left, right) = (f.keypoints[0], f.keypoints[1]);
    assert!(dist(left, reference.landmarks[0]) < 10.0, "image-left eye {left:?} vs {:?}", reference.landmarks[0]);
    assert!(dist(right, reference.landmarks[1]) < 10.0, "image-right eye {right:?} vs {:?}", reference.landmarks[1]);
    assert!(dist(f.keypoints[2], reference.landmarks[2]) < 12.0, "nose");
    Ok(())
}

#[test]
fn facemesh_regions_sit_on_the_face() -> anyhow::Result<()> {
    let img = photo("astronaut.png")?;
    let face = Mtcnn::new(1)?.detect_some(&img, "astronaut.png")?[0];
    let mesh_model = FaceMesh::load(mediapipe("face_landmark.onnx"), 1)?;
    let mesh = mesh_model.mesh(&img, &face)?;
    assert_eq!(mesh.points.len(), 468);
    assert_eq!(FaceMesh::embedded(1)?.mesh(&img, &face)?, mesh, "the embedded model is the asset");
    let centre = |idx: &[usize]| {
        let n = idx.len() as f32;
        let (sx, sy) = idx.iter().fold((0.0, 0.0), |(x, y), &i| (x + mesh.points[i][0], y + mesh.points[i][1]));
        [sx / n, sy / n]
    };
    let right_eye = centre(&easyphoto_face::facemesh::RIGHT_EYE); // subject's right = image left
    let left_eye = centre(&easyphoto_face::facemesh::LEFT_EYE);
    println!(
        "facemesh: presence {:.3}; eye centres {right_eye:?} {left_eye:?}, mtcnn {:?} {:?}",
        mesh.presence, face.landmarks[0], face.landmarks[1]
    );
    assert!(mesh.presence > 0.5);
    assert!(dist(right_eye, face.landmarks[0]) < 8.0 && dist(left_eye, face.landmarks[1]) < 8.0);

    let r = mesh_model.parse(&img, &face)?;
    let mouth =
        [(face.landmarks[3][0] + face.landmarks[4][0]) / 2.0, (face.landmarks[3][1] + face.landmarks[4][1]) / 2.0];
    println!(
        "areas: oval {} skin {} eyes {} brows {} lips {}",
        area(&r.face_oval),
        area(&r.skin),
        area(&r.eyes),
        area(&r.brows),
        area(&r.lips)
    );
    assert!(inside(&r.eyes, face.landmarks[0]) && inside(&r.eyes, face.landmarks[1]), "eyes mask misses the eyes");
    assert!(inside(&r.lips, mouth), "lips mask misses the mouth");
    assert!(inside(&r.skin, face.landmarks[2]), "skin mask misses the nose");
    assert!(!inside(&r.skin, face.landmarks[0]) && !inside(&r.skin, mouth), "skin includes eyes or lips");
    assert!(!inside(&r.face_oval, [5.0, 5.0]), "face oval reaches the corner");
    let (oval, skin) = (area(&r.face_oval), area(&r.skin));
    assert!(skin > oval * 7 / 10 && skin < oval, "skin {skin} of oval {oval}");
    assert!(area(&r.brows) > 100 && area(&r.eyes) > 100 && area(&r.lips) > 200);
    Ok(())
}
