//! OpenPose skeleton rendering against controlnet_aux / OpenCV (fixtures from
//! `tools/reference/controlnet_preproc_openpose.py`), and the MoveNet default on a real photo
//! (needs ONNX Runtime: `ORT_DYLIB_PATH`, which tools/test.sh sets).

use std::path::PathBuf;

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use easyphoto_controlnet::preprocess::PreprocessError;
use easyphoto_controlnet::preprocess::openpose::body_model::checkpoint_keys;
use easyphoto_controlnet::preprocess::openpose::draw::ellipse_to_polygon;
use easyphoto_controlnet::preprocess::openpose::{
    Body, BodyPoseModel, Keypoint, MoveNet, PoseMaps, annotate_openpose, decode, draw_bodypose, pose_maps,
};
use image::RgbImage;
use serde_json::Value;

fn crate_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn fixture_json(name: &str) -> Result<Value> {
    let path = crate_path("tests/fixtures/openpose").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn int(v: &Value) -> i32 {
    v.as_i64().expect("integer") as i32
}

#[test]
fn ellipse_polygons_match_opencv() -> Result<()> {
    let cases = fixture_json("ellipse2poly.json")?;
    for case in cases.as_array().context("cases")? {
        let center = (int(&case["center"][0]), int(&case["center"][1]));
        let axes = (int(&case["axes"][0]), int(&case["axes"][1]));
        let angle = int(&case["angle"]);
        let expected: Vec<(i32, i32)> =
            case["polygon"].as_array().context("polygon")?.iter().map(|p| (int(&p[0]), int(&p[1]))).collect();
        assert_eq!(ellipse_to_polygon(center, axes, angle), expected, "{center:?} {axes:?} {angle}");
    }
    Ok(())
}

#[test]
fn draw_bodypose_matches_controlnet_aux_pixel_for_pixel() -> Result<()> {
    let cases = fixture_json("draw_bodypose.json")?;
    for case in cases.as_array().context("cases")? {
        let (w, h) =
            (case["width"].as_u64().context("width")? as u32, case["height"].as_u64().context("height")? as u32);
        let mut canvas = RgbImage::new(w, h);
        for body in case["bodies"].as_array().context("bodies")? {
            let parts = body.as_array().context("body")?;
            let body: Body = std::array::from_fn(|i| {
                parts[i].as_array().map(|p| Keypoint {
                    x: p[0].as_f64().expect("x"),
                    y: p[1].as_f64().expect("y"),
                    score: 1.0,
                })
            });
            draw_bodypose(&mut canvas, &body);
        }
        let name = case["image"].as_str().context("image")?;
        let path = crate_path("tests/fixtures/openpose").join(name);
        let expected = image::open(&path).with_context(|| path.display().to_string())?.to_rgb8();
        let differing = canvas.pixels().zip(expected.pixels()).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} pixels differ from draw_bodypose");
    }
    Ok(())
}

#[test]
fn movenet_finds_a_plausible_upper_body_on_astronaut() -> Result<()> {
    let model = MoveNet::load(crate_path("assets/human_movenet-lightning.onnx"))?;
    let photo = image::open(crate_path("tests/assets/astronaut.png"))?.to_rgb8();
    let body = model.body(&photo, 0.3)?;
    let part = |i: usize, name: &str| body[i].with_context(|| format!("{name} not found"));
    let (nose, r_eye, l_eye) = (part(0, "nose")?, part(14, "right eye")?, part(15, "left eye")?);
    let (neck, r_shoulder, l_shoulder) = (part(1, "neck")?, part(2, "right shoulder")?, part(5, "left shoulder")?);
    println!("nose {nose:?}\nright eye {r_eye:?}\nleft eye {l_eye:?}\nshoulders {r_shoulder:?} {l_shoulder:?}");
    // The subject faces the camera: her right eye is on the image's left.
    assert!(r_eye.x < nose.x && nose.x < l_eye.x, "nose between the eyes");
    assert!(nose.y > r_eye.y.min(l_eye.y), "nose below the eyes");
    assert!(r_shoulder.y > nose.y + 0.1 && l_shoulder.y > nose.y + 0.1, "shoulders below the face");
    assert!(r_shoulder.x < l_shoulder.x, "right shoulder on the image's left");
    assert!((neck.x - (r_shoulder.x + l_shoulder.x) / 2.0).abs() < 1e-12, "neck is the shoulders' midpoint");

    let picture = model.control_image(&photo)?;
    assert_eq!(picture.dimensions(), photo.dimensions());
    let drawn = picture.pixels().filter(|p| p.0 != [0, 0, 0]).count();
    assert!(drawn > 2000, "skeleton drawn ({drawn} pixels)");
    // EASYPHOTO_WRITE_DOCS=1 refreshes the README's picture.
    let out = if std::env::var_os("EASYPHOTO_WRITE_DOCS").is_some() {
        crate_path("docs")
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    };
    std::fs::create_dir_all(&out)?;
    let tmp = out.join("openpose_astronaut.png.tmp");
    picture.save_with_format(&tmp, image::ImageFormat::Png)?;
    std::fs::rename(&tmp, out.join("openpose_astronaut.png"))?;
    Ok(())
}

/// The fixture's formula weights (see `tools/reference/controlnet_preproc_openpose.py`): element `i`
/// of the `t`-th key in sorted order from a splitmix64-style hash.
fn formula_weights(shapes: &[(String, Vec<usize>)]) -> Result<HashMap<String, Tensor>> {
    let mut sorted: Vec<&(String, Vec<usize>)> = shapes.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = HashMap::new();
    for (t, (key, shape)) in sorted.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let scale =
            if key.ends_with(".weight") { (6.0 / shape[1..].iter().product::<usize>() as f64).sqrt() } else { 0.1 };
        let values: Vec<f32> = (0..n as u64)
            .map(|i| {
                let mut x = (i + 1)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add((t as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
                x ^= x >> 31;
                x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
                x ^= x >> 29;
                let u = (x >> 40) as f64 / f64::from(1u32 << 24);
                ((2.0 * u - 1.0) * scale) as f32
            })
            .collect();
        out.insert(key.clone(), Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?);
    }
    Ok(out)
}

/// Shapes of every weight of the body network, from its own key list and layer table.
fn body_shapes() -> Result<Vec<(String, Vec<usize>)>> {
    // Build once with zeros to read the shapes the network asks for.
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    BodyPoseModel::new(vb)?;
    let data = varmap.data().lock().expect("varmap lock");
    Ok(data.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect())
}

/// Float32 through 46 convolutions: summation order differs from PyTorch's; 1e-4 is the bar.
const BODY_TOLERANCE: f32 = 1e-4;

#[test]
fn body_model_matches_controlnet_aux() -> Result<()> {
    let shapes = body_shapes()?;
    let mut keys: Vec<String> = shapes.iter().map(|(k, _)| k.clone()).collect();
    let mut expected_keys = checkpoint_keys();
    keys.sort();
    expected_keys.sort();
    assert_eq!(keys, expected_keys, "the network asks for exactly the checkpoint's keys");

    let weights = formula_weights(&shapes)?;
    let model = BodyPoseModel::new(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu))?;
    let io =
        candle_core::safetensors::load(crate_path("tests/fixtures/openpose/body_model_io.safetensors"), &Device::Cpu)?;
    let (paf, heat) = model.forward(&io["input"])?;
    for (name, ours) in [("paf", paf), ("heat", heat)] {
        let expected = &io[name];
        assert_eq!(ours.dims(), expected.dims(), "{name} shape");
        let err = (ours - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        println!("body model {name}: max abs error {err:.3e}");
        assert!(err < BODY_TOLERANCE, "{name}: max abs error {err}");
    }
    Ok(())
}

#[test]
fn body_model_names_the_missing_weight() {
    let path = crate_path("tests/fixtures/openpose/body_model_partial.pth");
    match BodyPoseModel::load(&path, &Device::Cpu) {
        Err(PreprocessError::MissingWeight { key, .. }) => assert_eq!(key, "conv1_2.weight"),
        other => panic!("expected a missing weight, got {other:?}"),
    }
    let corrupt = crate_path("tests/fixtures/openpose/draw_bodypose.json");
    assert!(matches!(BodyPoseModel::load(&corrupt, &Device::Cpu), Err(PreprocessError::Checkpoint { .. })));
}

/// Dense `[H, W, C]` f64 map from the fixture's sparse indices and values.
fn dense(io: &HashMap<String, Tensor>, name: &str, len: usize) -> Result<Vec<f64>> {
    let index = io[&format!("{name}_index")].to_vec1::<i64>()?;
    let value = io[&format!("{name}_value")].to_vec1::<f32>()?;
    let mut map = vec![0f64; len];
    for (i, v) in index.into_iter().zip(value) {
        map[i as usize] = f64::from(v);
    }
    Ok(map)
}

/// Peaks and limb scores are computed in f64 in the same operation order as controlnet_aux; only the
/// Gaussian's `exp` and summation may differ in the last bits.
const DECODE_TOLERANCE: f64 = 1e-9;

#[test]
fn decoding_matches_controlnet_aux_on_synthesised_skeletons() -> Result<()> {
    let io =
        candle_core::safetensors::load(crate_path("tests/fixtures/openpose/decode_maps.safetensors"), &Device::Cpu)?;
    let shape = io["shape"].to_vec1::<i64>()?;
    let (h, w) = (shape[0] as usize, shape[1] as usize);
    let heatmaps = dense(&io, "heat", h * w * 19)?;
    let pafs = dense(&io, "paf", h * w * 38)?;
    let decoded = decode(&PoseMaps { width: w, height: h, heatmaps: &heatmaps, pafs: &pafs })?;
    let short = PoseMaps { width: w, height: h, heatmaps: &heatmaps[1..], pafs: &pafs };
    assert!(matches!(decode(&short), Err(PreprocessError::InvalidParameter { name: "heatmaps", .. })));

    let expected = fixture_json("decode_expected.json")?;
    let table = |name: &str| -> Result<Vec<Vec<f64>>> {
        expected[name]
            .as_array()
            .context("table")?
            .iter()
            .map(|row| row.as_array().context("row")?.iter().map(|v| v.as_f64().context("number")).collect())
            .collect()
    };
    let (candidates, subset) = (table("candidate")?, table("subset")?);
    assert_eq!(decoded.candidates.len(), candidates.len(), "number of peaks");
    assert_eq!(decoded.subset.len(), subset.len(), "number of people");
    let mut worst = 0f64;
    for (ours, theirs) in decoded
        .candidates
        .iter()
        .map(|r| &r[..])
        .chain(decoded.subset.iter().map(|r| &r[..]))
        .zip(candidates.iter().chain(&subset))
    {
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(theirs) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("decode: {} peaks, {} people, max abs difference {worst:.3e}", candidates.len(), subset.len());
    assert!(worst < DECODE_TOLERANCE, "tables differ by {worst}");

    // The people found are the synthesised skeletons (within the peak's pixel rounding).
    let people = expected["people"].as_array().context("people")?;
    for (body, person) in decoded.bodies(w, h).iter().zip(people) {
        for (part, point) in body.iter().zip(person.as_array().context("person")?) {
            if let (Some(k), Some(p)) = (part, point.as_array()) {
                let (px, py) = (p[0].as_f64().context("x")?, p[1].as_f64().context("y")?);
                assert!((k.x * w as f64 - px).abs() <= 1.0 && (k.y * h as f64 - py).abs() <= 1.0);
            }
        }
    }
    Ok(())
}

/// Heat maps and PAFs after the network, ×8 Lanczos-4 and the area resize: float32 sums in another
/// order than OpenCV's SIMD rows.
const MAP_TOLERANCE: f64 = 1e-5;

#[test]
fn body_estimation_matches_controlnet_aux() -> Result<()> {
    let io =
        candle_core::safetensors::load(crate_path("tests/fixtures/openpose/estimate_io.safetensors"), &Device::Cpu)?;
    let pixels = io["image"].to_dtype(DType::U8)?;
    let (h, w, _) = pixels.dims3()?;
    let image = RgbImage::from_raw(w as u32, h as u32, pixels.flatten_all()?.to_vec1::<u8>()?).context("image")?;
    let model =
        BodyPoseModel::new(VarBuilder::from_tensors(formula_weights(&body_shapes()?)?, DType::F32, &Device::Cpu))?;
    let (heat, paf) = pose_maps(&model, &image, &Device::Cpu)?;

    for (name, ours, channels) in [("heat", &heat, 19), ("paf", &paf, 38)] {
        let samples = io[&format!("{name}_samples")].flatten_all()?.to_vec1::<f32>()?;
        let mut i = 0;
        let mut worst = 0f64;
        for y in (3..h).step_by(8) {
            for x in (3..w).step_by(8) {
                for c in 0..channels {
                    worst = worst.max((ours[(y * w + x) * channels + c] - f64::from(samples[i])).abs());
                    i += 1;
                }
            }
        }
        let sums = io[&format!("{name}_sums")].to_vec1::<f64>()?;
        let worst_sum = (0..channels)
            .map(|c| ((0..h * w).map(|p| ours[p * channels + c]).sum::<f64>() - sums[c]).abs())
            .fold(0f64, f64::max);
        println!("body estimation {name}: max abs error {worst:.3e} on samples, {worst_sum:.3e} on channel sums");
        assert!(worst < MAP_TOLERANCE, "{name} samples: {worst}");
        assert!(worst_sum < MAP_TOLERANCE * (h * w) as f64, "{name} sums: {worst_sum}");
    }

    let decoded = decode(&PoseMaps { width: w, height: h, heatmaps: &heat, pafs: &paf })?;
    let candidates = io["candidate"].to_vec2::<f64>()?;
    let subset = io["subset"].to_vec2::<f64>()?;
    println!(
        "body estimation: {} candidates, {} people (controlnet_aux: {}, {})",
        decoded.candidates.len(),
        decoded.subset.len(),
        candidates.len(),
        subset.len()
    );
    assert_eq!(decoded.candidates.len(), candidates.len(), "peaks");
    for (ours, theirs) in decoded.candidates.iter().zip(&candidates) {
        assert_eq!(ours[0..2], theirs[0..2], "peak position");
        assert!((ours[2] - theirs[2]).abs() < MAP_TOLERANCE, "peak score");
    }
    assert_eq!(decoded.subset.len(), subset.len(), "people");
    for (ours, theirs) in decoded.subset.iter().zip(&subset) {
        assert_eq!(ours[..18], theirs[..18], "parts of a person");
        assert_eq!(ours[19], theirs[19], "part count");
        assert!((ours[18] - theirs[18]).abs() < 1e-3, "person score");
    }

    // The whole annotator (OpenposeDetector, body only) draws the same picture.
    let picture = annotate_openpose(&model, &image, 128, &Device::Cpu)?;
    let path = crate_path("tests/fixtures/openpose/openpose_detector.png");
    let expected = image::open(&path).with_context(|| path.display().to_string())?.to_rgb8();
    assert_eq!(picture.dimensions(), expected.dimensions());
    let differing = picture.pixels().zip(expected.pixels()).filter(|(a, b)| a != b).count();
    println!("annotate_openpose: {differing} pixels differ from OpenposeDetector");
    assert_eq!(differing, 0, "annotate_openpose differs from OpenposeDetector");
    Ok(())
}
