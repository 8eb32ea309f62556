//! CPU kernels for the hot operations of the UNet and VAE, as candle custom ops.
//!
//! The model code calls the dispatch functions of the submodules ([`conv::conv2d`],
//! [`attention::attention`], [`norm::GroupNorm`], [`geglu::geglu`]). Each uses its kernel for
//! tensors on the CPU when no gradient is tracked through the op (or when the kernel has a
//! backward pass), and otherwise the plain candle composition it replaces, so results and
//! gradients never depend on which path ran beyond float rounding.
//!
//! Set `EASYPHOTO_CPU_KERNELS=0` (or call [`set_enabled`]) to use the plain candle path
//! everywhere, for comparisons. Threads: the kernels run on rayon's global pool, sized by
//! `RAYON_NUM_THREADS` like candle's own CPU ops.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, Layout, Result, Tensor};

pub mod attention;
pub mod conv;
pub mod geglu;
mod gemm;
pub mod linear;
pub mod norm;
pub mod pointwise;
pub mod profile;
mod simd;
mod winograd;

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
