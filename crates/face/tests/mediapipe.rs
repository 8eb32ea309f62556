//! BlazeFace and FaceMesh against `tools/reference/face_mediapipe.py`, an independent numpy
//! implementation of MediaPipe's anchor generation, detection decoding, weighted suppression,
//! face-mesh ROI and landmark projection, run on the same ONNX models (fixture
//! `mediapipe.safetensors`). Needs ORT_DYLIB_PATH (see the crate docs).

mod reference;

use easyphoto_face::{BlazeFace, Face, FaceMesh};
use image::imageops;
use reference::{Fixture, mediapipe, photo};

/// A crop `(x, y, w, h)` of a photo.
type Crop = Option<(u32, u32, u32, u32)>;

/// (fixture key, photo, crop): the cases of `face_mediapipe.py`.
const CASES: [(&str, &str, Crop); 6] = [
    ("astronaut", "astronaut.png", None),
    ("camera", "camera.png", None),
    ("sample1_left", "faceapi_sample1_640.png", Some((90, 60, 170, 200))),
    ("sample1_middle", "faceapi_sample1_640.png", Some((230, 90, 170, 190))),
    ("sample3_right", "faceapi_sample3_640.png", Some((450, 40, 170, 210))),
    ("sample4_wide", "faceapi_sample4_640.png", Some((60, 0, 460, 260))),
];

#[test]
fn blazeface_and_facemesh_match_mediapipe_reference() -> anyhow::Result<()> {
    let fx = Fixture::open("mediapipe.safetensors")?;
    let detector = BlazeFace::load(mediapipe("face_detection_short_range.onnx"), 1)?;
    let mesher = FaceMesh::embedded(1)?;
    let mut faces_seen = 0;
    for (key, file, crop) in CASES {
        let full = photo(file)?;
        let img = match crop {
            Some((x, y, w, h)) => imageops::crop_imm(&full, x, y, w, h).to_image(),
            None => full,
        };
        let dets = detector.detect(&img)?;
        let scores = fx.get(&format!("{key}.scores"))?.1;
        let boxes = fx.get(&format!("{key}.boxes"))?.1;
        let kps = fx.get(&format!("{key}.keypoints"))?.1;
        assert_eq!(dets.len(), scores.len(), "{key}: detections");
        let (mut score_err, mut box_err, mut kp_err) = (0.0f64, 0.0f64, 0.0f64);
        for (i, d) in dets.iter().enumerate() {
            score_err = score_err.max((f64::from(d.score) - scores[i]).abs());
            for j in 0..4 {
                box_err = box_err.max((f64::from(d.bbox[j]) - boxes[i * 4 + j]).abs());
            }
            for (k, p) in d.keypoints.iter().enumerate() {
                for j in 0..2 {
                    kp_err = kp_err.max((f64::from(p[j]) - kps[i * 12 + k * 2 + j]).abs());
                }
            }
        }
        println!(
            "{key}: {} detections, max abs error scores {score_err:e}, boxes {box_err:e} px, keypoints {kp_err:e} px",
            dets.len()
        );
        // float32 on coordinates of a few hundred pixels (ulp ~3e-5); the two sides suppress in
        // different units (pixels here, normalised coordinates in MediaPipe).
        assert!(score_err < 1e-6 && box_err < 1e-3 && kp_err < 1e-3, "{key}: differs from the reference");
        faces_seen += dets.len();

        let Some(d) = dets.first() else { continue };
        let k = d.keypoints;
        let face = Face { bbox: d.bbox, score: d.score, landmarks: [k[0], k[1], k[2], k[3], k[3]] };
        let mesh = mesher.mesh(&img, &face)?;
        let (shape, expected) = fx.get(&format!("{key}.mesh"))?;
        assert_eq!(shape, [468, 3], "{key}: mesh shape");
        let (mut xy_err, mut z_err) = (0.0f64, 0.0f64);
        for (p, e) in mesh.points.iter().zip(expected.chunks_exact(3)) {
            xy_err = xy_err.max((f64::from(p[0]) - e[0]).abs()).max((f64::from(p[1]) - e[1]).abs());
            z_err = z_err.max((f64::from(p[2]) - e[2]).abs());
        }
        let presence_err = (f64::from(mesh.presence) - fx.get(&format!("{key}.presence"))?.1[0]).abs();
        println!("{key}: mesh max abs error x/y {xy_err:e} px, z {z_err:e}, presence {presence_err:e}");
        assert!(xy_err < MESH_TOL && z_err < MESH_TOL && presence_err < 1e-4, "{key}: mesh differs");
    }
    assert!(faces_seen >= 8, "{faces_seen} faces in all: the cases should exercise the decoding");
    Ok(())
}

/// Landmark tolerance (image px; z in crop px). The two sides build the 192² crop from rotation
/// matrices that agree to ~1e-15 but not bit for bit (f64 ROI arithmetic in a different order), so
/// a few bilinear samples round to the neighbouring level (as in the `norm_crop` parity test);
/// the mesh moves by at most 2.1e-3 px in x/y and 3.3e-3 in z in response (measured on these
/// cases). Detection, which shares its input tensor with the reference, agrees to float32
/// rounding.
const MESH_TOL: f64 = 5e-3;
