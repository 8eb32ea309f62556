//! OpenCV's 8-bit CIE L\*a\*b\* conversions (`cv2.COLOR_RGB2LAB` / `COLOR_LAB2RGB` on `uint8`), bit
//! for bit, and EasyPhoto's colour shift: Reinhard mean/std transfer in that space.
//!
//! OpenCV converts 8-bit images with integer arithmetic and lookup tables (sRGB gamma, a cube-root
//! table, an L → Y table, an a/b → X/Z table); the tables here are built with the same constants,
//! operation order and f32/f64 precision as its `createLabTabs`, so results are identical, not
//! just close. 8-bit L\*a\*b\* stores `L·255/100`, `a + 128`, `b + 128`. Pixels are converted in
//! parallel on rayon's pool (`RAYON_NUM_THREADS`).

use std::sync::OnceLock;

use image::RgbImage;
use rayon::prelude::*;

use crate::FaceError;
use crate::morphology::Plane;

/// An 8-bit L\*a\*b\* image as OpenCV stores it: channels `L·255/100`, `a + 128`, `b + 128`.
pub type LabImage = RgbImage;

/// sRGB → XYZ (D65) and XYZ → sRGB, OpenCV's exact double constants (`color_lab.cpp`).
const RGB_TO_XYZ: [u64; 9] = [
    0x3fda65a14488c60d,
    0x3fd6e297396d0918,
    0x3fc71819d2391d58,
    0x3fcb38cda6e75ff6,
    0x3fe6e297396d0918,
    0x3fb279aae6c8f755,
    0x3f93cc4ac6cdaf4b,
    0x3fbe836eb4e98138,
    0x3fee68427418d691,
];
const XYZ_TO_RGB: [u64; 9] = [
    0x4009ec804102ff8f,
    0xbff8982a9930be0e,
    0xbfdfe7ff583a53b9,
    0xbfef042528ae74f3,
    0x3ffe040f23897204,
    0x3fa546d3f9e7b80b,
    0x3fac7de5082cf52c,
    0xbfca1e14bdfd2631,
    0x3ff0eabef06b3786,
];
/// The D65 white point (0.950456, 1, 1.088754).
const D65: [u64; 3] = [0x3fee6a22b3892ee8, 0x3ff0000000000000, 0x3ff16b8950763a19];

const XYZ_SHIFT: u32 = 12;
const GAMMA_SHIFT: u32 = 3;
const LAB_SHIFT2: u32 = XYZ_SHIFT + GAMMA_SHIFT;
const CBRT_TAB_SIZE: usize = 256 * 3 / 2 * (1 << GAMMA_SHIFT);
const INV_GAMMA_TAB_SIZE: usize = 1 << 12;
const LUT_BASE: i32 = 1 << 14;
const MIN_AB: i32 = -8145;
/// `lab_shift + (base_shift - inv_gamma_shift)` of OpenCV's integer L\*a\*b\* → RGB.
const RGB_SHIFT: u32 = 14;

struct Tables {
    /// `xyz[k][channel][v] = gamma(v) · coefficient`: row k (X, Y, Z) of the sRGB → XYZ product.
    xyz: [[[i32; 256]; 3]; 3],
    cbrt: Vec<i32>,
    inv_gamma: Vec<u8>,
    l_to_y_fy: [(i32, i32); 256],
    ab_to_xz: Vec<i32>,
    to_rgb: [i32; 9],
}

fn f(bits: u64) -> f64 {
    f64::from_bits(bits)
}

/// sRGB decoding of an f32 in [0, 1], in f64, returned as f32 (OpenCV's `applyGamma`).
fn apply_gamma(x: f32) -> f32 {
    let x = f64::from(x);
    let xshift = 11.0 / 200.0;
    (if x <= 809.0 / 20000.0 { x / (323.0 / 25.0) } else { ((x + xshift) / (1.0 + xshift)).powf(12.0 / 5.0) }) as f32
}

/// sRGB encoding (OpenCV's `applyInvGamma`).
fn apply_inv_gamma(x: f32) -> f32 {
    let x = f64::from(x);
    let xshift = 11.0 / 200.0;
    (if x <= 7827.0 / 2_500_000.0 { x * (323.0 / 25.0) } else { x.powf(1.0 / (12.0 / 5.0)) * (1.0 + xshift) - xshift })
        as f32
}

/// OpenCV's `softfloat` cube root (Turkowski's rational approximation in f64, mantissa truncated
/// to f32), which is not always the correctly rounded cube root: its table entries differ from
/// `f32::cbrt`'s where `32768·∛x` is within an ulp of a half.
fn cbrt(x: f32) -> f32 {
    const A: [u64; 9] = [
        0x4046a09e6653ba70,
        0x406808f46c6116e0,
        0x405dca97439cae14,
        0x402add70d2827500,
        0x3fc4f15f83f55d2d,
        0x402d9e20660edb21,
        0x4062ff15c0285815,
        0x406510d06a8112ce,
        0x4040fecbc9e2c375,
    ];
    let bits = x.to_bits();
    if bits & 0x7fff_ffff == 0 {
        return 0.0;
    }
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut shx = e % 3;
    if shx >= 0 {
        shx -= 3;
    }
    let ex = (e - shx) / 3 - 1;
    let fr = f64::from_bits((((shx + 1023) as u64) << 52) | (u64::from(bits & 0x7f_ffff) << 29));
    let a = A.map(f);
    let fr = ((((a[0] * fr + a[1]) * fr + a[2]) * fr + a[3]) * fr + a[4])
        / ((((a[5] * fr + a[6]) * fr + a[7]) * fr + a[8]) * fr + 1.0);
    let mantissa = ((fr.to_bits() & ((1 << 52) - 1)) >> 29) as u32;
    f32::from_bits((bits & 0x8000_0000) | (((ex + 127) as u32) << 23) | mantissa)
}

fn round_f32(x: f32) -> i32 {
    x.round_ties_even() as i32
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let gamma: [i32; 256] = std::array::from_fn(|i| round_f32(2040.0f32 * apply_gamma(i as f32 / 255.0f32)));

        let (lthresh, lscale, lbias) = (216.0f32 / 24389.0, 841.0f32 / 108.0, 16.0f32 / 116.0);
        let cb_scale = 1.0f32 / 2040.0;
        let cbrt = (0..CBRT_TAB_SIZE)
            .map(|i| {
                let x = cb_scale * i as f32;
                let v = if x < lthresh { x.mul_add(lscale, lbias) } else { cbrt(x) };
                round_f32(32768.0f32 * v)
            })
            .collect();

        let lshift = f64::from(1u32 << XYZ_SHIFT);
        let to_lab: [i32; 9] = std::array::from_fn(|k| {
            let (i, j) = (k / 3, k % 3);
            (lshift * f(RGB_TO_XYZ[i * 3 + j]) / f(D65[i])).round_ties_even() as i32
        });
        // Row r of XYZ → sRGB, each column scaled by the white point.
        let to_rgb = std::array::from_fn(|k| {
            let (r, j) = (k / 3, k % 3);
            (lshift * f(XYZ_TO_RGB[r * 3 + j]) * f(D65[j])).round_ties_even() as i32
        });

        let inv_gamma = (0..INV_GAMMA_TAB_SIZE)
            .map(|i| {
                let x = (1.0f32 / INV_GAMMA_TAB_SIZE as f32) * i as f32;
                round_f32(255.0f32 * apply_inv_gamma(x)) as u8
            })
            .collect();

        let l_to_y_fy = std::array::from_fn(|i| {
            let i = i as i32;
            if i <= 20 {
                let y = round_f32((i * LUT_BASE * 20 * 9) as f32 / (17 * 29 * 29 * 29) as f32);
                let fy = round_f32(LUT_BASE as f32 * (16.0f32 / 116.0 + (i * 5) as f32 / (3 * 17 * 29) as f32));
                (y, fy)
            } else {
                let fy = (i * 100 * LUT_BASE) as f32 / (255 * 116) as f32 + (16 * LUT_BASE) as f32 / 116.0f32;
                (round_f32(fy * fy * fy / (LUT_BASE * LUT_BASE) as f32), round_f32(fy))
            }
        });

        let ab_to_xz = (MIN_AB..LUT_BASE * 9 / 4 + MIN_AB)
            .map(|i| {
                if i <= 3390 {
                    i * 108 / 841 - LUT_BASE * 16 / 116 * 108 / 841
                } else {
                    i * i / LUT_BASE * i / LUT_BASE
                }
            })
            .collect();

        let xyz =
            std::array::from_fn(|k| std::array::from_fn(|ch| std::array::from_fn(|v| gamma[v] * to_lab[k * 3 + ch])));
        Tables { xyz, cbrt, inv_gamma, l_to_y_fy, ab_to_xz, to_rgb }
    })
}

fn descale(x: i32, n: u32) -> i32 {
    (x + (1 << (n - 1))) >> n
}

/// `cv2.cvtColor(img, cv2.COLOR_RGB2LAB)` on an 8-bit RGB image, bit-exact.
pub fn rgb_to_lab(img: &RgbImage) -> LabImage {
    let t = tables();
    let (l_scale, l_shift) = ((116 * 255 + 50) / 100, -((16 * 255 * (1 << LAB_SHIFT2) + 50) / 100));
    let mut out = img.clone();
    for_each_pixel(&mut out, |px| {
        let [r, g, b] = px.map(usize::from);
        let cube = |k: usize| {
            let row = &t.xyz[k];
            t.cbrt[descale(row[0][r] + row[1][g] + row[2][b], XYZ_SHIFT) as usize]
        };
        let (fx, fy, fz) = (cube(0), cube(1), cube(2));
        let l = descale(l_scale * fy + l_shift, LAB_SHIFT2);
        let a = descale(500 * (fx - fy) + (128 << LAB_SHIFT2), LAB_SHIFT2);
        let bb = descale(200 * (fy - fz) + (128 << LAB_SHIFT2), LAB_SHIFT2);
        *px = [l, a, bb].map(|v| v.clamp(0, 255) as u8);
    });
    out
}

/// Applies `f` to every RGB triple of `img`, rows in parallel (rayon).
fn for_each_pixel(img: &mut RgbImage, f: impl Fn(&mut [u8; 3]) + Sync) {
    let row = img.width() as usize * 3;
    if row == 0 {
        return;
    }
    img.par_chunks_mut(row * 8).for_each(|rows| {
        for px in rows.chunks_exact_mut(3) {
            f(px.try_into().expect("chunks of 3"));
        }
    });
}

/// `cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)` on an 8-bit L\*a\*b\* image, bit-exact.
pub fn lab_to_rgb(lab: &LabImage) -> RgbImage {
    let t = tables();
    let c = &t.to_rgb;
    let mut out = lab.clone();
    for_each_pixel(&mut out, |px| {
        let [l, a, b] = px.map(i32::from);
        let (y, fy) = t.l_to_y_fy[l as usize];
        let adiv = ((5 * a * 53687 + (1 << 7)) >> 13) - 128 * LUT_BASE / 500;
        let bdiv = ((b * 41943 + (1 << 4)) >> 9) - 128 * LUT_BASE / 200 + 1;
        let x = t.ab_to_xz[(fy + adiv - MIN_AB) as usize];
        let z = t.ab_to_xz[(fy - bdiv - MIN_AB) as usize];
        for (ch, v) in px.iter_mut().enumerate() {
            let linear = descale(c[ch * 3] * x + c[ch * 3 + 1] * y + c[ch * 3 + 2] * z, RGB_SHIFT);
            *v = t.inv_gamma[linear.clamp(0, INV_GAMMA_TAB_SIZE as i32 - 1) as usize];
        }
    });
    out
}

/// Per-channel mean and standard deviation as `cv2.meanStdDev` computes them (exact integer sums,
/// `sqrt(max(E[x²] − E[x]², 0))`), each rounded to 2 decimals as EasyPhoto's `np.around(.., 2)`.
pub fn mean_std(img: &RgbImage) -> ([f64; 3], [f64; 3]) {
    let n = f64::from(img.width()) * f64::from(img.height());
    let (mut sum, mut sq) = ([0u64; 3], [0u64; 3]);
    for px in img.pixels() {
        for c in 0..3 {
            let v = u64::from(px.0[c]);
            sum[c] += v;
            sq[c] += v * v;
        }
    }
    let round2 = |v: f64| (v * 100.0).round_ties_even() / 100.0;
    let mean = sum.map(|s| s as f64 / n);
    let std = std::array::from_fn(|c| (sq[c] as f64 / n - mean[c] * mean[c]).max(0.0).sqrt());
    (mean.map(round2), std.map(round2))
}

/// EasyPhoto's `color_transfer(sc, dc)`: Reinhard transfer of `src`'s colours towards `reference`'s
/// in 8-bit L\*a\*b\*: `(v − μs)·σr/σs + μr` per channel (statistics from [`mean_std`], arithmetic
/// in f64), clipped to [0, 255], rounded as `cv2.convertScaleAbs` does (through f32, half to even),
/// back to RGB.
///
/// A flat source channel (σs = 0, where numpy would produce NaN) is only shifted to the reference
/// mean. Errors if either image is empty.
pub fn color_transfer(src: &RgbImage, reference: &RgbImage) -> Result<RgbImage, FaceError> {
    for (what, img) in [("src", src), ("reference", reference)] {
        if img.width() == 0 || img.height() == 0 {
            return Err(FaceError::InvalidInput { what: format!("color_transfer: {what} image is empty") });
        }
    }
    let lab = rgb_to_lab(src);
    let (s_mean, s_std) = mean_std(&lab);
    let (t_mean, t_std) = mean_std(&rgb_to_lab(reference));
    // The mapping of each channel depends on the 8-bit value only: one table per channel.
    let lut: [[u8; 256]; 3] = std::array::from_fn(|c| {
        let scale = if s_std[c] == 0.0 { 1.0 } else { t_std[c] / s_std[c] };
        std::array::from_fn(|v| {
            let v = ((v as f64 - s_mean[c]) * scale + t_mean[c]).clamp(0.0, 255.0);
            (v as f32).abs().round_ties_even() as u8
        })
    });
    let mut out = lab;
    for_each_pixel(&mut out, |px| px.iter_mut().zip(&lut).for_each(|(v, lut)| *v = lut[usize::from(*v)]));
    Ok(lab_to_rgb(&out))
}

/// EasyPhoto's colour shift: [`color_transfer`] of `src` towards `reference`, composited over `src`
/// through `weights` (`box_blur(face mask, 32) / 255` in EasyPhoto) with
/// [`blend`](crate::masks::blend).
pub fn color_shift(src: &RgbImage, reference: &RgbImage, weights: &Plane<f32>) -> Result<RgbImage, FaceError> {
    crate::masks::blend(&color_transfer(src, reference)?, src, weights)
}
