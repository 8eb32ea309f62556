//! Elementwise math written so that LLVM vectorises it (no branches, no libm calls), and the
//! `multiversion!` macro that compiles a kernel body for AVX-512 and AVX2 and picks one at run
//! time.

/// Whether the CPU has AVX-512F (checked once).
#[inline]
pub(super) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX2 and FMA (checked once).
#[inline]
pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Defines `fn name(args)` whose body is compiled three times (AVX-512, AVX2+FMA, baseline) and
/// dispatched on the running CPU. The body should be plain loops over slices.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn inner($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { inner($($arg),*) }
                if $crate::cpu::simd::has_avx512() {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::cpu::simd::has_avx2() {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(super) use multiversion;

/// `e^x`, relative error about 2e-7 (Cephes `expf`); inputs are clamped to [-87, 88].
#[inline(always)]
#[allow(clippy::manual_clamp)] // max/min vectorise without clamp's NaN handling
pub(super) fn exp(x: f32) -> f32 {
    let x = x.max(-87.0).min(88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// The error function, absolute error below 1e-6 (the rational approximation of Eigen's
/// `generic_fast_erf_float`).
#[inline(always)]
#[allow(clippy::manual_clamp)] // max/min vectorise without clamp's NaN handling
pub(super) fn erf(x: f32) -> f32 {
    let x = x.max(-4.0).min(4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024_1e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_3e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// `x · Φ(x)` with the exact (erf) normal CDF, as `torch.nn.functional.gelu`.
#[inline(always)]
pub(super) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_erf_silu_match_libm() {
        let mut worst = (0f64, 0f64, 0f64);
        for i in -200_000..=200_000 {
            let x = i as f32 * 4e-5;
            let e = super::exp(x) as f64;
            let want = (x as f64).exp();
            worst.0 = worst.0.max((e - want).abs() / want);
            worst.1 = worst.1.max((super::erf(x) as f64 - libm_erf(x as f64)).abs());
            let s = super::silu(x) as f64;
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            worst.2 = worst.2.max((s - want).abs() / want.abs().max(1e-3));
        }
        assert!(worst.0 < 5e-7, "exp rel err {}", worst.0);
        assert!(worst.1 < 2e-6, "erf abs err {}", worst.1);
        assert!(worst.2 < 1e-6, "silu err {}", worst.2);
    }

    /// erf in f64 (reference only): the Taylor series for |x| <= 3, the asymptotic erfc beyond.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        if a > 3.0 {
            let x2 = a * a;
            let tail = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2);
            return x.signum() * (1.0 - (-x2).exp() / (a * std::f64::consts::PI.sqrt()) * tail);
        }
        let (mut sum, mut term, mut n) = (x, x, 0.0f64);
        while term.abs() > 1e-18 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
