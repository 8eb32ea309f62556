//! 2-D convolution (groups 1, dilation 1, any kernel size, stride and padding) as im2col tiles
//! fed to a matrix product, in parallel over output tiles.
//!
//! Per image, the output `[C_out, H_o·W_o]` is `W [C_out, C_in·k_h·k_w]` times the column matrix
//! `[C_in·k_h·k_w, H_o·W_o]`, whose row `(c, dy, dx)` holds input channel `c` shifted by
//! `(dy, dx)`. The kernel's natural layout is already that weight matrix, so nothing is
//! repacked. Each tile of output rows builds its slice of the column matrix (row segments
//! copied from a zero-padded copy of the input) in a per-thread buffer, and the product writes
//! straight into the output. 1×1 stride-1 convolutions read the input in place. Small maps
//! (the 8×8 and 16×16 levels) put all images of the batch side by side so the weights stream
//! once, and split the output channels across threads instead.
//!
//! candle's own conv2d (0.11.1) copies the input to NHWC element by element, builds 512-pixel
//! im2col tiles, nests rayon inside gemm's threading and scatters the result.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{SendPtr, Weights, f32_data, gemm::sgemm, gemm_dtypes, inference, threads};

/// How 3×3 stride-1 convolutions of maps of at least 1024 output pixels are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winograd {
    /// im2col and one product, like every other convolution.
    Off,
    /// F(2×2, 3×3): products 2.25× smaller; rounding as the direct convolution's (about 8e-7
    /// of the largest output against an f64 reference, candle's own f32 path 5e-7).
    F2,
    /// F(4×4, 3×3) where the batch has at least 4096 output pixels (F2 below): products 4×
    /// smaller, about 15% faster than F2 on the 64² UNet level, but 1–2e-5 relative error.
    F4,
}

impl Winograd {
    /// The process-wide choice: `EASYPHOTO_WINOGRAD` = `0`, `2` (the default) or `4`.
    pub fn from_env() -> Self {
        static CHOICE: std::sync::OnceLock<Winograd> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| match std::env::var("EASYPHOTO_WINOGRAD").as_deref() {
            Ok("0") => Self::Off,
            Ok("4") => Self::F4,
            _ => Self::F2,
        })
    }
}

/// `conv2d(x, weight) + bias` through the kernel, or `None` where it does not apply (a tracked
/// gradient, a dtype other than f32 / f16 / bf16, groups or dilation other than 1, a non-CPU
/// device): the caller then uses candle's convolution. Computes in f32; the result has `x`'s dtype.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &candle_nn::Conv2dConfig,
) -> Result<Option<Tensor>> {
    conv2d_with(x, weight, bias, cfg, Winograd::from_env())
}

/// [`conv2d`] with an explicit Winograd choice.
pub fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &candle_nn::Conv2dConfig,
    winograd: Winograd,
) -> Result<Option<Tensor>> {
    let mut args = vec![x, weight];
    args.extend(bias);
    if !inference(&args)
        || cfg.groups != 1
        || cfg.dilation != 1
        || !gemm_dtypes(x, weight)
        || x.rank() != 4
        || weight.rank() != 4
        || x.dim(1)? != weight.dim(1)?
    {
        return Ok(None);
    }
    let cout = weight.dim(0)?;
    let bias = match bias {
        Some(b) => b.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::zeros(cout, DType::F32, x.device())?,
    };
    if bias.dims() != [cout] {
        return Ok(None);
    }
    let op = Conv2dOp { stride: cfg.stride, padding: cfg.padding, winograd };
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias, &op)?;
    Ok(Some(y.to_dtype(x.dtype())?))
}

/// The convolution as a candle op: `x` `[B, C_in, H, W]`, `weight` `[C_out, C_in, k_h, k_w]`,
/// `bias` `[C_out]`, all contiguous; `x` and `bias` f32, the weight f32, f16 or bf16 (converted
/// once per call: every output tile reads all of it).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dOp {
    pub stride: usize,
    pub padding: usize,
    pub winograd: Winograd,
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "easyphoto-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, w) = xl.shape().dims4()?;
        let (cout, wcin, kh, kw) = wl.shape().dims4()?;
        if wcin != cin || bl.shape().dims() != [cout] {
            candle_core::bail!("conv2d: input {:?}, weight {:?}, bias {:?}", xl.dims(), wl.dims(), bl.dims())
        }
        let (s, p) = (self.stride.max(1), self.padding);
        if h + 2 * p < kh || w + 2 * p < kw {
            candle_core::bail!("conv2d: kernel {kh}×{kw} larger than the padded {h}×{w} input")
        }
        let geo =
            Geometry { b, cin, h, w, cout, kh, kw, s, p, ho: (h + 2 * p - kh) / s + 1, wo: (w + 2 * p - kw) / s + 1 };
        let wt = Weights::of(ws, wl)?.to_f32();
        let out = conv_f32(f32_data(xs, xl)?, &wt, f32_data(bs, bl)?, &geo, self.winograd);
        Ok((CpuStorage::F32(out), Shape::from((b, cout, geo.ho, geo.wo))))
    }
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }
    fn kdim(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    fn hp(&self) -> usize {
        self.h + 2 * self.p
    }
    fn wp(&self) -> usize {
        self.w + 2 * self.p
    }
}

/// Below this many output pixels per image, the batch shares one column matrix.
const SMALL_MAP: usize = 1024;
/// Bytes of column matrix per tile (about the L2 cache).
const TILE_BYTES: usize = 1 << 20;

thread_local! {
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn conv_f32(x: &[f32], wt: &[f32], bias: &[f32], g: &Geometry, winograd: Winograd) -> Vec<f32> {
    let hw_o = g.ho * g.wo;
    let mut out = vec![0f32; g.b * g.cout * hw_o];
    if out.is_empty() {
        return out;
    }
    if g.kh == 3 && g.kw == 3 && g.s == 1 && hw_o >= SMALL_MAP {
        let shape = super::winograd::Shape { b: g.b, cin: g.cin, cout: g.cout, h: g.h, w: g.w, p: g.p };
        let variant = match winograd {
            // F(4×4, 3×3) once the maps are large enough to amortise its bigger weight
            // transform (the 64² UNet level, the VAE); F(2×2, 3×3) otherwise.
            Winograd::F4 if g.b * hw_o >= 4096 => Some(&super::winograd43::F4),
            Winograd::F2 | Winograd::F4 => Some(&super::winograd::F2),
            Winograd::Off => None,
        };
        if let Some(variant) = variant {
            super::winograd::conv3x3(variant, x, wt, bias, &shape, &mut out);
            return out;
        }
    }
    // A zero-padded copy of the input, so that im2col rows are plain copies.
    let padded;
    let xp: &[f32] = if g.p == 0 {
        x
    } else {
        padded = pad(x, g);
        &padded
    };
    if hw_o >= SMALL_MAP || g.b == 1 && g.cout < 256 {
        conv_tiled(xp, wt, bias, g, &mut out);
    } else {
        conv_batched(xp, wt, bias, g, &mut out);
    }
    out
}

fn pad(x: &[f32], g: &Geometry) -> Vec<f32> {
    let (hp, wp, p) = (g.hp(), g.wp(), g.p);
    let mut xp = vec![0f32; g.b * g.cin * hp * wp];
    xp.par_chunks_mut(hp * wp).zip(x.par_chunks(g.h * g.w)).for_each(|(dst, src)| {
        for (y, row) in src.chunks(g.w).enumerate() {
            dst[(y + p) * wp + p..][..g.w].copy_from_slice(row);
        }
    });
    xp
}

/// Writes rows `krows` of the column matrix of output rows `oy0..oy1` of image `img` into
/// `cols` (row `r` at `cols[(r - krows.start) * col_stride..]`, `(oy1 - oy0)·W_o` values); `xp`
/// is the padded input.
fn im2col(
    xp: &[f32],
    g: &Geometry,
    img: usize,
    (oy0, oy1): (usize, usize),
    krows: std::ops::Range<usize>,
    cols: &mut [f32],
    col_stride: usize,
) {
    let (hp, wp, wo) = (g.hp(), g.wp(), g.wo);
    let image = &xp[img * g.cin * hp * wp..][..g.cin * hp * wp];
    for (i, r) in krows.enumerate() {
        let (c, dy, dx) = (r / (g.kh * g.kw), r / g.kw % g.kh, r % g.kw);
        let chan = &image[c * hp * wp..][..hp * wp];
        let dst = &mut cols[i * col_stride..][..(oy1 - oy0) * wo];
        for (oy, seg) in (oy0..oy1).zip(dst.chunks_exact_mut(wo)) {
            let src = &chan[(oy * g.s + dy) * wp + dx..];
            if g.s == 1 {
                seg.copy_from_slice(&src[..wo]);
            } else {
                for (ox, d) in seg.iter_mut().enumerate() {
                    *d = src[ox * g.s];
                }
            }
        }
    }
}

/// Large maps: tasks are (image, band of output rows), each one product into the output.
fn conv_tiled(xp: &[f32], wt: &[f32], bias: &[f32], g: &Geometry, out: &mut [f32]) {
    let (hw_o, kdim) = (g.ho * g.wo, g.kdim());
    let target_cols = if g.pointwise() { 1024 } else { (TILE_BYTES / 4 / kdim).clamp(64, 1024) };
    let mut rows = target_cols.div_ceil(g.wo).clamp(1, g.ho);
    // Enough tasks to keep every thread busy, even for one image.
    let min_tasks = 4 * threads();
    while rows > 1 && g.b * g.ho.div_ceil(rows) < min_tasks {
        rows = rows.div_ceil(2);
    }
    let bands = g.ho.div_ceil(rows);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..g.b * bands).into_par_iter().for_each(|task| {
        let (img, band) = (task / bands, task % bands);
        let (oy0, oy1) = (band * rows, ((band + 1) * rows).min(g.ho));
        let n = (oy1 - oy0) * g.wo;
        // SAFETY: each task writes only its own rows oy0..oy1 of image img.
        let dst = unsafe { out_ptr.get().add(img * g.cout * hw_o + oy0 * g.wo) };
        for (co, &bv) in bias.iter().enumerate() {
            unsafe { std::slice::from_raw_parts_mut(dst.add(co * hw_o), n).fill(bv) };
        }
        if g.pointwise() {
            let src = &xp[img * g.cin * hw_o + oy0 * g.wo..];
            unsafe { sgemm((g.cout, n, kdim), dst, hw_o, true, (wt.as_ptr(), kdim, 1), (src.as_ptr(), hw_o, 1), 1) };
            return;
        }
        COLS.with_borrow_mut(|cols| {
            if cols.len() < kdim * n {
                cols.resize(kdim * n, 0.0);
            }
            im2col(xp, g, img, (oy0, oy1), 0..kdim, cols, n);
            unsafe { sgemm((g.cout, n, kdim), dst, hw_o, true, (wt.as_ptr(), kdim, 1), (cols.as_ptr(), n, 1), 1) };
        });
    });
}

/// Small maps: one column matrix `[k_dim, B·H_o·W_o]` for the whole batch, the output channels
/// split across threads, then the `[C_out, B, H_o·W_o]` product reordered to `[B, C_out, …]`.
fn conv_batched(xp: &[f32], wt: &[f32], bias: &[f32], g: &Geometry, out: &mut [f32]) {
    let (hw_o, kdim) = (g.ho * g.wo, g.kdim());
    let n = g.b * hw_o;
    let cols_owned;
    let cols: &[f32] = if g.pointwise() && g.b == 1 {
        xp
    } else {
        let mut cols = vec![0f32; kdim * n];
        // Build the columns in parallel over bands of rows, image by image.
        let band = kdim.div_ceil(4 * threads()).max(1);
        cols.par_chunks_mut(band * n).enumerate().for_each(|(i, chunk)| {
            let r0 = i * band;
            let r1 = r0 + chunk.len() / n;
            for img in 0..g.b {
                im2col(xp, g, img, (0, g.ho), r0..r1, &mut chunk[img * hw_o..], n);
            }
        });
        cols_owned = cols;
        &cols_owned
    };
    let mut prod = if g.b == 1 { Vec::new() } else { vec![0f32; g.cout * n] };
    let (dst_all, dst_rs) = if g.b == 1 { (out.as_mut_ptr(), hw_o) } else { (prod.as_mut_ptr(), n) };
    let dst_all = SendPtr(dst_all);
    let chunk = g.cout.div_ceil(2 * threads()).next_multiple_of(16).min(g.cout);
    (0..g.cout.div_ceil(chunk)).into_par_iter().for_each(|i| {
        let (m0, m1) = (i * chunk, ((i + 1) * chunk).min(g.cout));
        // SAFETY: each task writes only output channels m0..m1.
        let dst = unsafe { dst_all.get().add(m0 * dst_rs) };
        for (co, &bv) in bias[m0..m1].iter().enumerate() {
            unsafe { std::slice::from_raw_parts_mut(dst.add(co * dst_rs), n).fill(bv) };
        }
        unsafe {
            sgemm((m1 - m0, n, kdim), dst, dst_rs, true, (wt[m0 * kdim..].as_ptr(), kdim, 1), (cols.as_ptr(), n, 1), 1)
        };
    });
    if g.b > 1 {
        out.par_chunks_mut(hw_o).enumerate().for_each(|(i, dst)| {
            let (img, co) = (i / g.cout, i % g.cout);
            dst.copy_from_slice(&prod[co * n + img * hw_o..][..hw_o]);
        });
    }
}
