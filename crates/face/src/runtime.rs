//! ONNX Runtime: loading the shared library once per process, and [`OnnxModel`], a session usable from
//! several threads.
//!
//! The library is loaded at run time (ort's `load-dynamic`): from `ORT_DYLIB_PATH` when it is set,
//! otherwise the platform's default name (`libonnxruntime.so`, `libonnxruntime.dylib`,
//! `onnxruntime.dll`) on the loader's search path. ONNX Runtime 1.31 or newer is required.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ndarray::{Array, ArrayD, ArrayView, CowArray, Dimension, IxDyn};
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;

use crate::FaceError;

/// The process-wide environment, set by the first successful initialisation.
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

/// The library path [`environment`] loads: `ORT_DYLIB_PATH`, or the platform's default library name.
pub fn dylib_path() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(path) if !path.is_empty() => path.into(),
        _ => format!("{}onnxruntime{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX).into(),
    }
}

/// The ONNX Runtime environment, loading the library from [`dylib_path`] on first use.
pub fn environment() -> Result<Environment, FaceError> {
    environment_from(dylib_path())
}

/// The ONNX Runtime environment, loading the library from `path` on first use.
///
/// Thread-safe; the first successful call wins and later calls return the same environment whatever
/// `path` they pass (a process can load the runtime only once). Failures are not cached, so a later
/// call may retry. Give an absolute path: ort tries a relative one next to the executable first.
pub fn environment_from(path: impl AsRef<Path>) -> Result<Environment, FaceError> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(env) = slot.as_ref() {
        return Ok(env.clone());
    }
    let path = path.as_ref();
    let builder =
        ort::init_from(path).map_err(|source| FaceError::RuntimeUnavailable { path: path.to_path_buf(), source })?;
    let env = builder.with_name("easyphoto-face").build()?;
    *slot = Some(env.clone());
    Ok(env)
}

/// A model input: an f32 or i32 tensor, made with `Input::from` from an ndarray `&Array` or `ArrayView`.
///
/// ONNX Runtime needs row-major contiguous data: a standard-layout array is borrowed, any other is
/// copied.
#[derive(Debug, Clone)]
pub struct Input<'a>(Tensor<'a>);

#[derive(Debug, Clone)]
enum Tensor<'a> {
    F32(CowArray<'a, f32, IxDyn>),
    I32(CowArray<'a, i32, IxDyn>),
}

impl Input<'_> {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match &self.0 {
            Tensor::F32(a) => a.shape(),
            Tensor::I32(a) => a.shape(),
        }
    }

    fn to_value(&self) -> ort::Result<SessionInputValue<'_>> {
        Ok(match &self.0 {
            Tensor::F32(a) => TensorRef::from_array_view(a)?.into(),
            Tensor::I32(a) => TensorRef::from_array_view(a)?.into(),
        })
    }
}

/// Borrows a standard-layout view; copies any other into standard layout.
fn contiguous<A: Clone, D: Dimension>(view: ArrayView<'_, A, D>) -> CowArray<'_, A, IxDyn> {
    let view = view.into_dyn();
    if view.is_standard_layout() {
        CowArray::from(view)
    } else {
        CowArray::from(view.as_standard_layout().into_owned())
    }
}

macro_rules! input_from {
    ($elem:ty, $variant:ident) => {
        impl<'a, D: Dimension> From<ArrayView<'a, $elem, D>> for Input<'a> {
            fn from(view: ArrayView<'a, $elem, D>) -> Self {
                Input(Tensor::$variant(contiguous(view)))
            }
        }

        impl<'a, D: Dimension> From<&'a Array<$elem, D>> for Input<'a> {
            fn from(array: &'a Array<$elem, D>) -> Self {
                Input(Tensor::$variant(contiguous(array.view())))
            }
        }
    };
}

input_from!(f32, F32);
input_from!(i32, I32);

/// An ONNX model on the CPU.
///
/// `Send + Sync`: the session sits behind a [`Mutex`], so concurrent [`run`](Self::run) calls on one
/// model take turns (each still uses the model's intra-op threads). For parallel throughput, load one
/// `OnnxModel` per worker thread.
#[derive(Debug)]
pub struct OnnxModel {
    session: Mutex<Session>,
    /// Declared input names and shapes (-1 for a dynamic dimension), in model order.
    inputs: Vec<(String, Vec<i64>)>,
    /// Declared output names and shapes, in model order.
    outputs: Vec<(String, Vec<i64>)>,
}

impl OnnxModel {
    /// Loads the model at `path`, initialising the runtime first (see [`environment`]).
    ///
    /// `threads` is the number of intra-op threads; 0 lets ONNX Runtime choose (one per physical core).
    pub fn load(path: impl AsRef<Path>, threads: usize) -> Result<Self, FaceError> {
        let path = path.as_ref();
        let env = environment()?;
        let session = Session::builder(&env)
            .and_then(|builder| builder.with_intra_threads(threads).map_err(ort::Error::from))
            .and_then(|mut builder| builder.commit_from_file(path))
            .map_err(|source| FaceError::ModelLoad { path: path.to_path_buf(), source })?;
        Ok(Self::from_session(session))
    }

    /// Loads a model from its bytes (for models embedded in the binary); `name` stands for the
    /// path in errors.
    pub fn from_memory(bytes: &[u8], name: &str, threads: usize) -> Result<Self, FaceError> {
        let env = environment()?;
        let session = Session::builder(&env)
            .and_then(|builder| builder.with_intra_threads(threads).map_err(ort::Error::from))
            .and_then(|mut builder| builder.commit_from_memory(bytes))
            .map_err(|source| FaceError::ModelLoad { path: PathBuf::from(name), source })?;
        Ok(Self::from_session(session))
    }

    fn from_session(session: Session) -> Self {
        let describe = |outlets: &[ort::value::Outlet]| {
            outlets
                .iter()
                .map(|outlet| {
                    let shape = outlet.dtype().tensor_shape().map(|shape| shape.to_vec()).unwrap_or_default();
                    (outlet.name().to_string(), shape)
                })
                .collect()
        };
        let (inputs, outputs) = (describe(session.inputs()), describe(session.outputs()));
        Self { session: Mutex::new(session), inputs, outputs }
    }

    /// The declared inputs: names and shapes (-1 for a dynamic dimension), in model order.
    pub fn inputs(&self) -> &[(String, Vec<i64>)] {
        &self.inputs
    }

    /// The declared outputs: names and shapes (-1 for a dynamic dimension), in model order.
    pub fn outputs(&self) -> &[(String, Vec<i64>)] {
        &self.outputs
    }

    /// Runs the model on named inputs and returns every output, by name, as an f32 array.
    ///
    /// An input whose shape disagrees with the model's declared shape gives [`FaceError::BadShape`];
    /// unknown names, wrong element types and non-f32 outputs give [`FaceError::Ort`].
    pub fn run(&self, inputs: &[(&str, Input<'_>)]) -> Result<HashMap<String, ArrayD<f32>>, FaceError> {
        for (name, input) in inputs {
            self.check_shape(name, input.shape())?;
        }
        let values =
            inputs.iter().map(|(name, input)| Ok((*name, input.to_value()?))).collect::<ort::Result<Vec<_>>>()?;

        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session.run(values)?;
        outputs
            .iter()
            .map(|(name, value)| Ok((name.to_string(), value.try_extract_array::<f32>()?.to_owned())))
            .collect()
    }

    fn check_shape(&self, name: &str, found: &[usize]) -> Result<(), FaceError> {
        let Some((_, expected)) = self.inputs.iter().find(|(n, _)| n == name) else {
            return Ok(()); // ONNX Runtime reports unknown names itself
        };
        let matches =
            expected.len() == found.len() && expected.iter().zip(found).all(|(&e, &f)| e < 0 || e as usize == f);
        if matches {
            Ok(())
        } else {
            Err(FaceError::BadShape { name: name.to_string(), expected: expected.clone(), found: found.to_vec() })
        }
    }
}
