//! The f32 matrix product every kernel here goes through: the `gemm` crate (the one candle's CPU
//! backend uses), with its AVX-512 kernels enabled by this crate's `gemm/x86-v4` feature.

/// `dst (+)= a · b` for an `m × k` by `k × n` product. Strides are in elements; `dst` is row-major
/// with row stride `dst_rs`. With `accumulate`, the product is added to what `dst` holds.
///
/// # Safety
/// Every pointer must be valid for the elements its strides and sizes address, and `dst` must
/// not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                unsafe { std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0) };
            }
        }
        return;
    }
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// What a product does with its destination.
#[derive(Clone, Copy)]
pub(super) enum Dst<'a> {
    /// `dst = a · b`.
    Overwrite,
    /// `dst += a · b`.
    Accumulate,
    /// `dst = bias + a · b`, with `bias` one value per column.
    Bias(&'a [f32]),
}

/// [`sgemm`] split into row bands × column chunks (the [`super::linear::grid`] split), one
/// single-threaded product per task on rayon's pool: for the small and mid-size products of
/// training, where gemm's own threading costs more than it gains.
///
/// # Safety
/// As [`sgemm`]; a bias holds `n` values.
pub(super) unsafe fn par_sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    init: Dst,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
) {
    use rayon::prelude::*;
    let threads = super::threads();
    let (rb, cb) = if threads == 1 || m * n * k < 1 << 18 { (1, 1) } else { super::linear::grid(m, n, threads) };
    let band = m.div_ceil(rb);
    let chunk = n.div_ceil(cb).next_multiple_of(16).min(n);
    let cb = n.div_ceil(chunk.max(1));
    let (dst, a, b) = (dst as usize, a as usize, b as usize);
    let task = |task: usize| {
        let (r0, c0) = ((task / cb) * band, (task % cb) * chunk);
        let (nr, nc) = (band.min(m.saturating_sub(r0)), chunk.min(n.saturating_sub(c0)));
        if nr == 0 || nc == 0 {
            return;
        }
        let (dst, a, b) = (dst as *mut f32, a as *const f32, b as *const f32);
        // SAFETY: each task writes its own block of `dst`; the caller guarantees the rest.
        unsafe {
            let block = dst.add(r0 * dst_rs + c0);
            if let Dst::Bias(bias) = init {
                for r in 0..nr {
                    std::ptr::copy_nonoverlapping(bias[c0..c0 + nc].as_ptr(), block.add(r * dst_rs), nc);
                }
            }
            let accumulate = !matches!(init, Dst::Overwrite);
            let (a, b) = ((a.add(r0 * a_rs), a_rs, a_cs), (b.add(c0 * b_cs), b_rs, b_cs));
            sgemm((nr, nc, k), block, dst_rs, accumulate, a, b, 1)
        };
    };
    if rb * cb == 1 {
        task(0);
    } else {
        (0..rb * cb).into_par_iter().for_each(task);
    }
}

/// A new row-major `m × n` buffer holding `a · b` (`init`: [`Dst::Overwrite`] or
/// [`Dst::Bias`]), through [`par_sgemm`], written without being zero-filled first (with
/// `keep_freed_memory` a zeroed allocation is a serial memset).
///
/// # Safety
/// As [`par_sgemm`].
pub(super) unsafe fn par_product(
    (m, n, k): (usize, usize, usize),
    init: Dst,
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
) -> Vec<f32> {
    assert!(!matches!(init, Dst::Accumulate), "a new buffer has nothing to accumulate into");
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: `out` has room for m × n values, and the product writes every one of them.
    unsafe {
        par_sgemm((m, n, k), out.as_mut_ptr(), n, init, a, b);
        out.set_len(m * n);
    }
    out
}
