//! CPU kernels for the hot operations of the UNet and VAE, as candle custom ops.
//!
//! The model code calls the dispatch functions of the submodules ([`conv::conv2d`] (im2col, or
//! Winograd for 3×3 stride-1 on large maps), [`linear::linear`], [`attention::attention`],
//! [`norm::GroupNorm`] (+ SiLU), [`geglu::linear_geglu`] / [`geglu::geglu`], and the
//! transformer's 1×1 projections [`pointwise`]). Each returns its kernel's result for f32
//! tensors on the CPU when no gradient is tracked through the op, and `None` (or, for the
//! modules, the plain composition) otherwise: LoRA training, other dtypes and GPU devices take
//! the original candle path, so gradients are exactly as before. None of the kernels has a
//! backward pass, except [`attention_backward`], the attention kernel for training.
//!
//! Set `EASYPHOTO_CPU_KERNELS=0` (or call [`set_enabled`]) to use the plain candle path
//! everywhere, for comparisons; `EASYPHOTO_WINOGRAD=0|2|4` picks the 3×3 algorithm
//! ([`conv::Winograd`]); `EASYPHOTO_PROFILE=1` turns on [`profile`]. Threads: the kernels run on
//! rayon's global pool, sized by `RAYON_NUM_THREADS` like candle's own CPU ops (2 threads ⇒ 2 on
//! both). The `gemm` crate's AVX-512 kernels are enabled by this crate's `gemm/x86-v4` feature
//! (detected at run time), which also speeds up candle's own matmuls.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, Layout, Result, Tensor};

pub mod attention;
pub mod causal_attention;
pub mod attention_backward;
pub mod conv;
pub mod geglu;
pub mod layer_norm;
mod gemm;
pub mod linear;
pub mod linear_rows;
pub mod norm;
pub mod pointwise;
pub mod profile;
mod simd;
pub mod text_layer;
mod winograd;
mod winograd43;

static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Turns the kernels on or off for the whole process (`None`: back to the environment's
/// choice, `EASYPHOTO_CPU_KERNELS`, on unless it is `0`).
pub fn set_enabled(on: Option<bool>) {
    OVERRIDE.store(
        match on {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        },
        Ordering::Relaxed,
    );
}

/// Whether the kernels are used (see [`set_enabled`]).
pub fn enabled() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    match OVERRIDE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => *ENV.get_or_init(|| std::env::var("EASYPHOTO_CPU_KERNELS").map_or(true, |v| v != "0")),
    }
}

/// Kernels are enabled and every tensor lives on the CPU.
fn on_cpu(ts: &[&Tensor]) -> bool {
    enabled() && ts.iter().all(|t| t.device().is_cpu())
}

/// Kernels are enabled, every tensor lives on the CPU and none needs a gradient.
fn inference(ts: &[&Tensor]) -> bool {
    on_cpu(ts) && ts.iter().all(|t| !t.track_op())
}

/// The contiguous f32 data of a custom op's argument.
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("cpu kernel: expected a contiguous input, got strides {:?}", layout.stride()),
    }
}

/// Threads the kernels split work across.
fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// A raw pointer that may cross threads; every user writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}
