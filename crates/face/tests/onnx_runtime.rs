//! OnnxModel against Python onnxruntime on MediaPipe BlazeFace (short range), fixture from
//! `tools/reference/face_onnx_io.py`. Needs ORT_DYLIB_PATH (see the crate docs).

use std::path::{Path, PathBuf};

use anyhow::Context;
use easyphoto_face::{FaceError, Input, OnnxModel, load_rgb, to_nchw_signed};
use ndarray::{Array4, ArrayD};
use safetensors::{Dtype, SafeTensors};

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/assets").join(name)
}

fn mediapipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mediapipe").join(name)
}

/// The f32 tensors of the reference fixture, by name.
fn fixture(name: &str) -> anyhow::Result<ArrayD<f32>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blazeface_short_io.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let tensors = SafeTensors::deserialize(&bytes)?;
    let view = tensors.tensor(name)?;
    anyhow::ensure!(view.dtype() == Dtype::F32, "{name} is {:?}, expected F32", view.dtype());
    let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(ArrayD::from_shape_vec(view.shape(), values)?)
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn blazeface() -> anyhow::Result<OnnxModel> {
    Ok(OnnxModel::load(mediapipe("face_detection_short_range.onnx"), 2)?)
}

#[test]
fn blazeface_matches_python_onnxruntime() -> anyhow::Result<()> {
    let model = blazeface()?;
    let input = fixture("input")?;
    let outputs = model.run(&[("input", Input::from(&input))])?;

    for name in ["regressors", "classificators"] {
        let ours = &outputs[name];
        let reference = fixture(name)?;
        let err = max_abs_diff(ours, &reference);
        println!("{name} {:?}: max abs error {err:e}", ours.shape());
        assert!(err <= 1e-4, "{name}: max abs error {err} > 1e-4");
    }
    assert_eq!(outputs["regressors"].shape(), [1, 896, 16]);
    assert_eq!(outputs["classificators"].shape(), [1, 896, 1]);

    let best = outputs["classificators"].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let score = 1.0 / (1.0 + (-best).exp());
    println!("best anchor score {score}");
    assert!(score > 0.5, "no face found in astronaut.png: best score {score}");
    Ok(())
}

#[test]
fn one_model_serves_several_threads() -> anyhow::Result<()> {
    let model = blazeface()?;
    let input = fixture("input")?;
    let single = model.run(&[("input", Input::from(&input))])?;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..3).map(|_| scope.spawn(|| model.run(&[("input", Input::from(&input))]))).collect();
        for worker in workers {
            let outputs = worker.join().expect("worker panicked")?;
            assert_eq!(outputs, single);
        }
        Ok(())
    })
}

#[test]
fn bad_model_files_are_typed_errors() -> anyhow::Result<()> {
    let missing = asset("no_such_model.onnx");
    match OnnxModel::load(&missing, 1) {
        Err(FaceError::ModelLoad { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected ModelLoad for a missing file, got {other:?}"),
    }

    let truncated = Path::new(env!("CARGO_TARGET_TMPDIR")).join("truncated_face_detection.onnx");
    let bytes = std::fs::read(mediapipe("face_detection_short_range.onnx"))?;
    std::fs::write(&truncated, &bytes[..bytes.len() / 3])?;
    match OnnxModel::load(&truncated, 1) {
        Err(err @ FaceError::ModelLoad { .. }) => {
            assert!(err.to_string().contains(&*truncated.to_string_lossy()), "{err}");
        }
        other => panic!("expected ModelLoad for a truncated file, got {other:?}"),
    }
    Ok(())
}

#[test]
fn wrong_input_shape_is_a_typed_error() -> anyhow::Result<()> {
    let model = blazeface()?;
    let small = Array4::<f32>::zeros((1, 3, 64, 64));
    match model.run(&[("input", Input::from(&small))]) {
        Err(FaceError::BadShape { name, expected, found }) => {
            assert_eq!(name, "input");
            assert_eq!(expected, [1, 3, 128, 128]);
            assert_eq!(found, [1, 3, 64, 64]);
        }
        other => panic!("expected BadShape, got {other:?}"),
    }
    Ok(())
}

/// The Python script reimplements image-rs's Triangle resize in float32 with the same operation
/// order, so the tensors must be identical, not merely close.
#[test]
fn rust_preprocessing_matches_python() -> anyhow::Result<()> {
    let ours = to_nchw_signed(&load_rgb(asset("astronaut.png"))?, 128, 128).into_dyn();
    let reference = fixture("input")?;
    let err = max_abs_diff(&ours, &reference);
    println!("preprocessing max abs error {err:e}");
    assert_eq!(err, 0.0);

    // Not an image at all: the loader sniffs the format and names the file.
    match load_rgb(mediapipe("face_detection_short_range.onnx")) {
        Err(FaceError::UnsupportedImage { path }) => {
            assert!(path.ends_with("face_detection_short_range.onnx"))
        }
        other => panic!("expected UnsupportedImage, got {other:?}"),
    }
    Ok(())
}
