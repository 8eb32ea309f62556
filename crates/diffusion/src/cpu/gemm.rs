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
