//! Weight lookups that report missing keys and wrong shapes as typed errors.

use candle_core::Tensor;
use candle_nn::{Conv2dConfig, VarBuilder};
use easyphoto_diffusion::layers::Conv2d;

use crate::ControlNetError;

/// A `kernel x kernel` conv with bias, read from `vb.pp(name)` (the diffusion crate's layer, with
/// its CPU kernels and LoRA hook).
pub(crate) fn conv2d(
    vb: &VarBuilder,
    name: &str,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    config: Conv2dConfig,
) -> Result<Conv2d, ControlNetError> {
    let vb = vb.pp(name);
    tensor(&vb, "weight", &[out_channels, in_channels, kernel, kernel])?;
    tensor(&vb, "bias", &[out_channels])?;
    Ok(Conv2d::new(vb, in_channels, out_channels, kernel, config.stride, config.padding)?)
}

/// The tensor `name` under `vb`, which must have shape `shape`.
fn tensor(vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<Tensor, ControlNetError> {
    let err = match vb.get(shape, name) {
        Ok(tensor) => return Ok(tensor),
        Err(err) => err,
    };
    let key = match vb.prefix() {
        prefix if prefix.is_empty() => name.to_string(),
        prefix => format!("{prefix}.{name}"),
    };
    if !vb.contains_tensor(name) {
        return Err(ControlNetError::MissingWeight { key });
    }
    match vb.get_unchecked(name) {
        Ok(stored) if stored.dims() != shape => {
            Err(ControlNetError::ShapeMismatch { key, expected: shape.to_vec(), found: stored.dims().to_vec() })
        }
        _ => Err(err.into()),
    }
}
