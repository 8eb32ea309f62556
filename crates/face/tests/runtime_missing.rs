//! A runtime that cannot be loaded is an error value, not a panic. This binary holds one test so
//! that no other test has loaded ONNX Runtime into the process first.

use easyphoto_face::FaceError;
use easyphoto_face::runtime::environment_from;

#[test]
fn missing_runtime_is_a_typed_error() {
    let tried = std::path::Path::new("/nonexistent/onnxruntime/libonnxruntime.so.1.32.0");
    match environment_from(tried) {
        Err(err @ FaceError::RuntimeUnavailable { .. }) => {
            let message = err.to_string();
            assert!(message.contains(&*tried.to_string_lossy()), "{message}");
            assert!(message.contains("ORT_DYLIB_PATH"), "{message}");
        }
        other => panic!("expected RuntimeUnavailable, got {other:?}"),
    }
}
