//! CPU kernels for the hot operations of the UNet and VAE, as candle custom ops.
//!
//! The model code calls the dispatch functions of the submodules ([`conv::conv2d`] (im2col, or
//! Winograd for 3×3 stride-1 on large maps), [`linear::linear`], [`attention::attention`],
//! [`norm::GroupNorm`] (+ SiLU), [`geglu::linear_geglu`] / [`geglu::geglu`], and the
//! transformer's 1×1 projections [`pointwise`]). Each returns its kernel's result for f32
//! tensors on the CPU when no gradient is tracked through the op, and `None` (or, for the
//! modules, the plain composition) otherwise. LoRA training (gradients to the inputs and to the
//! low-rank terms, frozen weights) has its own ops with their own backward passes:
//! [`low_rank`] (a layer and its trained LoRA), [`attention_backward`], [`norm_backward`], GEGLU,
//! and the frozen linear and convolution layers; other dtypes and GPU devices take the candle
//! path. [`rank_update`] merges a LoRA into its weight (`W + U·D`).
//!
//! Set `EASYPHOTO_CPU_KERNELS=0` (or call [`set_enabled`]) to use the plain candle path
//! everywhere, for comparisons; `EASYPHOTO_WINOGRAD=0|2|4` picks the 3×3 algorithm
//! ([`conv::Winograd`]); `EASYPHOTO_PROFILE=1` turns on [`profile`]. Threads: the kernels run on
//! rayon's global pool, sized by `RAYON_NUM_THREADS` like candle's own CPU ops (2 threads ⇒ 2 on
//! both). [`keep_freed_memory`] is the recommended allocator setting for a process that runs
//! models (glibc), and [`serial_candle_pool`] the recommended thread setting.
//! [`set_weight_dtype`] keeps an f32 model's linear and convolution weights in f16 / bf16 (half
//! the memory; the kernels convert them as they read them). The `gemm` crate's
//! AVX-512 kernels are enabled by this crate's `gemm/x86-v4` feature (detected at run time),
//! which also speeds up candle's own matmuls.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

pub use alloc::keep_freed_memory;

mod alloc;
pub mod attention;
pub mod attention_backward;
pub mod causal_attention;
pub mod conv;
pub mod geglu;
mod gemm;
pub mod layer_norm;
pub mod linear;
pub mod linear_rows;
pub mod low_rank;
pub mod norm;
pub mod norm_backward;
pub mod pointwise;
pub mod profile;
pub mod rank_update;
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

/// The process-wide choice of [`set_weight_dtype`]: 0 unset, else 1 + an index into
/// `WEIGHT_DTYPES`.
static WEIGHT_DTYPE: AtomicU8 = AtomicU8::new(0);
const WEIGHT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Chooses how the linear and convolution weights of models loaded from now on for f32 compute
/// on the CPU are kept in memory: `Some(F16)` / `Some(BF16)` halves their memory (the kernels
/// convert them to f32 as they read them; the products stay f32), `Some(F32)` keeps them f32,
/// `None` goes back to the environment's choice, `EASYPHOTO_CPU_WEIGHTS=f16|bf16|f32` (f32 when
/// unset). Other dtypes are ignored. Models loaded in f16 / bf16 keep their weights in that dtype
/// anyway; their kernels compute in f32 too.
pub fn set_weight_dtype(dtype: Option<DType>) {
    let code = dtype.and_then(|d| WEIGHT_DTYPES.iter().position(|&w| w == d)).map_or(0, |i| i as u8 + 1);
    WEIGHT_DTYPE.store(code, Ordering::Relaxed);
}

/// The dtype in which an f32 model on the CPU keeps its linear and convolution weights (see
/// [`set_weight_dtype`]).
pub fn weight_dtype() -> DType {
    static ENV: OnceLock<DType> = OnceLock::new();
    match WEIGHT_DTYPE.load(Ordering::Relaxed) {
        0 => *ENV.get_or_init(|| match std::env::var("EASYPHOTO_CPU_WEIGHTS").as_deref() {
            Ok("f16") => DType::F16,
            Ok("bf16") => DType::BF16,
            _ => DType::F32,
        }),
        code => WEIGHT_DTYPES[usize::from(code - 1)],
    }
}

/// Whether a gemm kernel takes input `x` and `weight`: both f32, f16 or bf16 (the kernel computes
/// in f32 and returns `x`'s dtype).
fn gemm_dtypes(x: &Tensor, weight: &Tensor) -> bool {
    WEIGHT_DTYPES.contains(&x.dtype()) && WEIGHT_DTYPES.contains(&weight.dtype())
}

/// A weight as a kernel reads it: f32, or f16 / bf16 converted to f32 piece by piece.
#[derive(Clone, Copy)]
enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

impl<'a> Weights<'a> {
    /// The contiguous weight data of a custom op's argument.
    fn of(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("cpu kernel: expected a contiguous weight, got strides {:?}", layout.stride())
        };
        Ok(match storage {
            CpuStorage::F16(d) => Self::F16(&d[start..end]),
            CpuStorage::BF16(d) => Self::BF16(&d[start..end]),
            _ => Self::F32(&storage.as_slice::<f32>()?[start..end]),
        })
    }

    /// Elements `start..start + len` as f32: borrowed, or converted into `buf`.
    fn slice<'b>(&self, start: usize, len: usize, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        use half::slice::HalfFloatSliceExt;
        let end = start + len;
        match *self {
            Self::F32(d) => &d[start..end],
            Self::F16(d) => {
                buf.resize(len, 0.0);
                d[start..end].convert_to_f32_slice(buf);
                buf
            }
            Self::BF16(d) => {
                buf.resize(len, 0.0);
                d[start..end].convert_to_f32_slice(buf);
                buf
            }
        }
    }

    /// The whole weight as f32: borrowed, or converted (in parallel) into a new buffer. For
    /// kernels that read every weight many times per call (convolutions: once per output tile),
    /// where one conversion per call costs next to nothing against the products.
    fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        use half::slice::HalfFloatSliceExt;
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let mut out = match self {
            Self::F32(d) => return std::borrow::Cow::Borrowed(d),
            Self::F16(d) => vec![0f32; d.len()],
            Self::BF16(d) => vec![0f32; d.len()],
        };
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, dst)| match self {
            Self::F16(d) => d[i * CHUNK..][..dst.len()].convert_to_f32_slice(dst),
            Self::BF16(d) => d[i * CHUNK..][..dst.len()].convert_to_f32_slice(dst),
            Self::F32(d) => dst.copy_from_slice(&d[i * CHUNK..][..dst.len()]),
        });
        std::borrow::Cow::Owned(out)
    }
}

/// The contiguous f32 data of a custom op's argument.
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("cpu kernel: expected a contiguous input, got strides {:?}", layout.stride()),
    }
}

/// Sets `CANDLE_NUM_THREADS=1` unless the environment sets it. candle's element-wise thread pool
/// (candle 0.11) spins for a while after each op; with few cores it takes CPU time from the
/// kernels' rayon threads (LoRA training step on 2 threads: 0.38 s instead of 0.43–0.47 s). The
/// element-wise work left to candle is small. Call it first thing in `main`.
///
/// # Safety
/// As [`std::env::set_var`]: no other thread may read or write the environment meanwhile.
pub unsafe fn serial_candle_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees that no other thread uses the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// Calls `f` with the contiguous f32 data of each of `ts` (tensors on the CPU), borrowed from
/// their storage (for backward passes and optimizers, whose arguments are tensors rather than
/// storages); an error for other tensors.
pub fn with_f32s<const N: usize, R>(ts: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        let candle_core::Storage::Cpu(s) = &**storage else { candle_core::bail!("cpu kernel: expected a CPU tensor") };
        *slot = f32_data(s, layout)?;
    }
    f(slices)
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
