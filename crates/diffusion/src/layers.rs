//! Linear and convolution layers addressable by their diffusers module path, with the extension
//! point the `easyphoto-lora` crate uses; plus the norms and activations the models share.
//!
//! Every [`Linear`] and [`Conv2d`] of a model knows its path (for example
//! `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). A model implements
//! [`VisitLayers`], so a caller can attach [`Adapter`]s (run-time low-rank deltas, trainable
//! through candle's autograd), detach them (hot-swap without reloading), or replace weights
//! (merge). With no adapter attached a layer costs one empty-`Vec` check.

use std::sync::Arc;

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A term added to a layer's output, computed from the layer's input (a LoRA branch
/// `scale * up(down(x))`, a full delta `x @ Dᵀ`, ...).
pub trait Adapter: Send + Sync + std::fmt::Debug {
    /// The term to add to the wrapped layer's output for input `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// The term as `scale · up · down` over the layer's input features, when it is one
    /// (linear layers and 1×1 convolutions): a trained one then runs fused with its layer.
    fn low_rank(&self) -> Option<LowRank> {
        None
    }
}

/// A low-rank term `scale · up · down`: `down` `[r, in]`, `up` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// The layer and its only adapter as one op with its own backward when that adapter is a
/// low-rank term being trained (see [`crate::cpu::low_rank`]).
fn fused_low_rank(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    adapters: &[Arc<dyn Adapter>],
) -> Result<Option<Tensor>> {
    match adapters {
        [adapter] => match adapter.low_rank() {
            Some(lr) => crate::cpu::low_rank::linear(x, weight, bias, &lr.down, &lr.up, lr.scale),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

/// `y = x Wᵀ + b`, plus the attached adapters.
#[derive(Debug, Clone)]
pub struct Linear {
    path: String,
    inner: candle_nn::Linear,
    adapters: Vec<Arc<dyn Adapter>>,
}

impl Linear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias`) under `vb`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = stored_weight(&vb, vb.get((out_dim, in_dim), "weight")?)?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { path: vb.prefix(), inner: candle_nn::Linear::new(weight, bias), adapters: vec![] })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Replaces the weight (for merging a delta); the shape must not change.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        same_shape(&self.path, self.weight(), &weight)?;
        self.inner = candle_nn::Linear::new(weight, self.inner.bias().cloned());
        Ok(())
    }

    pub fn attach(&mut self, adapter: Arc<dyn Adapter>) {
        self.adapters.push(adapter);
    }

    pub fn detach_all(&mut self) {
        self.adapters.clear();
    }

    pub fn adapters(&self) -> &[Arc<dyn Adapter>] {
        &self.adapters
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle 0.11.1 computes a wrong product for a batched, transposed (non-contiguous)
        // input here; copying costs nothing for the usual contiguous input.
        let _p = crate::cpu::profile::scope_flops("linear", 2.0 * (x.elem_count() * self.weight().dim(0)?) as f64);
        let x = &x.contiguous()?;
        if let Some(y) = fused_low_rank(x, self.weight(), self.bias(), &self.adapters)? {
            return Ok(y);
        }
        if let Some(y) = frozen(x, self.weight(), self.bias(), || Frozen::Linear)? {
            return add_adapters(y, x, &self.adapters);
        }
        let y = match crate::cpu::linear::linear(x, self.weight(), self.bias())? {
            Some(y) => y,
            None if self.weight().dtype() != x.dtype() => {
                candle_nn::Linear::new(like(self.weight(), x)?, self.bias().cloned()).forward(x)?
            }
            None => self.inner.forward(x)?,
        };
        add_adapters(y, x, &self.adapters)
    }
}

/// A linear or convolution weight of an f32 model on the CPU in the dtype chosen by
/// [`crate::cpu::set_weight_dtype`] (f16 / bf16: half the memory; the kernels compute in f32).
fn stored_weight(vb: &VarBuilder, weight: Tensor) -> Result<Tensor> {
    match crate::cpu::weight_dtype() {
        dtype if vb.dtype() == DType::F32 && vb.device().is_cpu() => weight.to_dtype(dtype),
        _ => Ok(weight),
    }
}

/// `w` in `x`'s dtype, for the candle paths (the weight may be stored in f16 / bf16).
fn like(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    w.to_dtype(x.dtype())
}

/// A 2-D convolution, plus the attached adapters.
#[derive(Debug, Clone)]
pub struct Conv2d {
    path: String,
    inner: candle_nn::Conv2d,
    adapters: Vec<Arc<dyn Adapter>>,
}

impl Conv2d {
    /// Loads a square `kernel` convolution with bias under `vb`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
        let weight = stored_weight(&vb, vb.get((out_channels, in_channels, kernel, kernel), "weight")?)?;
        let bias = vb.get(out_channels, "bias")?;
        Ok(Self { path: vb.prefix(), inner: candle_nn::Conv2d::new(weight, Some(bias), cfg), adapters: vec![] })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn config(&self) -> &candle_nn::Conv2dConfig {
        self.inner.config()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Replaces the weight (for merging a delta); the shape must not change.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        same_shape(&self.path, self.weight(), &weight)?;
        self.inner = candle_nn::Conv2d::new(weight, self.inner.bias().cloned(), *self.inner.config());
        Ok(())
    }

    pub fn attach(&mut self, adapter: Arc<dyn Adapter>) {
        self.adapters.push(adapter);
    }

    pub fn detach_all(&mut self) {
        self.adapters.clear();
    }

    pub fn adapters(&self) -> &[Arc<dyn Adapter>] {
        &self.adapters
    }

    /// A 1×1 convolution applied to the `[…, C_in]` tokens of a map, returning `[…, C_out]`
    /// tokens, when its only adapter is a low-rank term being trained; `None` otherwise.
    pub fn forward_tokens(&self, tokens: &Tensor) -> Result<Option<Tensor>> {
        let cfg = self.config();
        let pointwise = self.weight().dims().get(2..) == Some(&[1, 1][..]) && cfg.stride == 1 && cfg.padding == 0;
        if !pointwise || cfg.groups != 1 {
            return Ok(None);
        }
        let weight = self.weight().reshape((self.weight().dim(0)?, self.weight().dim(1)?))?;
        fused_low_rank(tokens, &weight, self.bias(), &self.adapters)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _p = crate::cpu::profile::scope_flops(
            conv_kind(self.weight(), self.config()),
            conv_flops(x, self.weight(), self.config()),
        );
        if let Some(y) = frozen(x, self.weight(), self.bias(), || Frozen::Conv2d(*self.config()))? {
            return add_adapters(y, x, &self.adapters);
        }
        let y = match crate::cpu::conv::conv2d(x, self.inner.weight(), self.inner.bias(), self.inner.config())? {
            Some(y) => y,
            None if self.weight().dtype() != x.dtype() => {
                candle_nn::Conv2d::new(like(self.weight(), x)?, self.bias().cloned(), *self.config()).forward(x)?
            }
            None => self.inner.forward(x)?,
        };
        add_adapters(y, x, &self.adapters)
    }
}

/// A frozen (untracked) f32 layer on the CPU whose input needs a gradient (LoRA training).
#[derive(Debug, Clone, Copy)]
enum Frozen {
    Linear,
    Conv2d(candle_nn::Conv2dConfig),
}

/// The layer as an op with a backward for its input only: candle's own matmul / conv backward
/// also computes the gradient of the (frozen) weight, doubling the backward work. The forward
/// runs the CPU kernels. `None` when it does not apply (no gradient to the input, a tracked
/// weight, not f32, not on the CPU).
fn frozen(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, kind: impl Fn() -> Frozen) -> Result<Option<Tensor>> {
    let applies = x.track_op()
        && !weight.track_op()
        && !bias.is_some_and(|b| b.track_op())
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && !matches!(kind(), Frozen::Conv2d(c) if c.groups != 1);
    if !applies {
        return Ok(None);
    }
    let op = FrozenOp { kind: kind(), weight: weight.clone(), bias: bias.cloned() };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

#[derive(Debug)]
struct FrozenOp {
    kind: Frozen,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl candle_core::CustomOp1 for FrozenOp {
    fn name(&self) -> &'static str {
        "frozen-layer"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (candle_core::CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("frozen layer: expected a contiguous f32 input")
        };
        // The kernels' ops run on the input's storage directly (no copies in or out).
        let weight = self.weight.contiguous()?;
        let direct = match self.kind {
            Frozen::Linear => layout.dims().last() == weight.dims().get(1),
            Frozen::Conv2d(cfg) => {
                cfg.dilation == 1 && layout.dims().len() == 4 && layout.dims()[1] == weight.dim(1)?
            }
        };
        if direct {
            let bias = match &self.bias {
                Some(b) => b.to_dtype(DType::F32)?.contiguous()?,
                None => Tensor::zeros(weight.dim(0)?, DType::F32, &candle_core::Device::Cpu)?,
            };
            let ((ws, wl), (bs, bl)) = (weight.storage_and_layout(), bias.storage_and_layout());
            let (candle_core::Storage::Cpu(ws), candle_core::Storage::Cpu(bs)) = (&*ws, &*bs) else {
                candle_core::bail!("frozen layer: weights not on the CPU")
            };
            use candle_core::CustomOp3;
            return match self.kind {
                Frozen::Linear => crate::cpu::linear::LinearOp.cpu_fwd(storage, layout, ws, wl, bs, bl),
                Frozen::Conv2d(cfg) => {
                    let winograd = crate::cpu::conv::Winograd::from_env();
                    let op = crate::cpu::conv::Conv2dOp { stride: cfg.stride, padding: cfg.padding, winograd };
                    op.cpu_fwd(storage, layout, ws, wl, bs, bl)
                }
            };
        }
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &candle_core::Device::Cpu)?;
        let (w, b) = (&self.weight, self.bias.as_ref());
        let y = match self.kind {
            Frozen::Linear => match crate::cpu::linear::linear(&x, w, b)? {
                Some(y) => y,
                None => candle_nn::Linear::new(like(w, &x)?, b.cloned()).forward(&x)?,
            },
            Frozen::Conv2d(cfg) => match crate::cpu::conv::conv2d(&x, w, b, &cfg)? {
                Some(y) => y,
                None => candle_nn::Conv2d::new(like(w, &x)?, b.cloned(), cfg).forward(&x)?,
            },
        };
        let shape = y.shape().clone();
        Ok((candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = &like(&self.weight, grad)?;
        let flops = 2.0 * (arg.elem_count() * self.weight.dim(0)?) as f64;
        Ok(Some(match self.kind {
            Frozen::Linear => {
                let _p = crate::cpu::profile::scope_flops("linear backward", flops);
                grad.broadcast_matmul(w)?
            }
            Frozen::Conv2d(cfg) => {
                let _p = crate::cpu::profile::scope_flops(
                    match (cfg.stride, w.dim(2)?) {
                        (1, 1) => "conv1x1 backward",
                        (1, _) => "conv backward",
                        _ => "conv backward/s2",
                    },
                    flops * (w.dim(2)? * w.dim(3)?) as f64 / (cfg.stride * cfg.stride) as f64,
                );
                let (p, s, d) = (cfg.padding, cfg.stride, cfg.dilation);
                let k = w.dim(2)?;
                if s == 1 && d == 1 && k == w.dim(3)? && p < k {
                    // Stride 1: the input gradient is the convolution of the output gradient
                    // with the kernel flipped and its channel axes swapped, which the CPU
                    // kernels run (candle's conv_transpose2d is far slower).
                    let flipped = flip_kernel(w)?;
                    let cfg = candle_nn::Conv2dConfig { padding: k - 1 - p, ..cfg };
                    if let Some(g) = crate::cpu::conv::conv2d(&grad.detach().contiguous()?, &flipped, None, &cfg)? {
                        return Ok(Some(g));
                    }
                }
                col2im_input_grad(&grad.detach(), w, &cfg, (arg.dim(2)?, arg.dim(3)?))?
            }
        }))
    }
}

/// `w [C_out, C_in, k, k]` with its channel axes swapped and each kernel rotated by 180°.
fn flip_kernel(w: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (cout, cin, k, _) = w.dims4()?;
    let kk = k * k;
    let out = crate::cpu::with_f32s([&w.to_dtype(DType::F32)?.contiguous()?], |[src]| {
        let mut out = vec![0f32; src.len()];
        out.par_chunks_exact_mut(cout * kk).enumerate().for_each(|(ci, dst)| {
            for (co, taps) in dst.chunks_exact_mut(kk).enumerate() {
                let from = &src[(co * cin + ci) * kk..][..kk];
                for (t, x) in taps.iter_mut().zip(from.iter().rev()) {
                    *t = *x;
                }
            }
        });
        Ok(out)
    })?;
    Tensor::from_vec(out, (cin, cout, k, k), w.device())
}

/// The input gradient of a convolution (any stride, padding and dilation) as `Wᵀ · grad`
/// (one product per image: the gradient of every input tap) scattered back onto the input grid
/// (col2im), for input maps of `(h, w)`. candle's `conv_transpose2d` is several times slower.
fn col2im_input_grad(
    grad: &Tensor,
    w: &Tensor,
    cfg: &candle_nn::Conv2dConfig,
    (h, wd): (usize, usize),
) -> Result<Tensor> {
    use rayon::prelude::*;
    let (b, cout, ho, wo) = grad.dims4()?;
    let (_, cin, kh, kw) = w.dims4()?;
    let (s, p, d) = (cfg.stride, cfg.padding, cfg.dilation);
    let wt = w.to_dtype(DType::F32)?.reshape((cout, cin * kh * kw))?.t()?;
    let cols = wt.broadcast_matmul(&grad.to_dtype(DType::F32)?.contiguous()?.reshape((b, cout, ho * wo))?)?;
    let cols = cols.flatten_all()?.to_vec1::<f32>()?;
    let mut dx = vec![0f32; b * cin * h * wd];
    dx.par_chunks_exact_mut(h * wd).enumerate().for_each(|(plane, dst)| {
        let (bi, ci) = (plane / cin, plane % cin);
        for (t, row) in cols[(bi * cin + ci) * kh * kw * ho * wo..].chunks_exact(ho * wo).take(kh * kw).enumerate() {
            let (dy, dxk) = (t / kw, t % kw);
            for oy in 0..ho {
                let Some(y) = (oy * s + dy * d).checked_sub(p).filter(|&y| y < h) else { continue };
                for ox in 0..wo {
                    if let Some(x) = (ox * s + dxk * d).checked_sub(p).filter(|&x| x < wd) {
                        dst[y * wd + x] += row[oy * wo + ox];
                    }
                }
            }
        }
    });
    Tensor::from_vec(dx, (b, cin, h, wd), grad.device())?.to_dtype(grad.dtype())
}

fn conv_kind(w: &Tensor, cfg: &candle_nn::Conv2dConfig) -> &'static str {
    match (w.dims().get(2), cfg.stride) {
        (Some(1), _) => "conv1x1",
        (_, 1) => "conv3x3",
        _ => "conv3x3/s2",
    }
}

fn conv_flops(x: &Tensor, w: &Tensor, cfg: &candle_nn::Conv2dConfig) -> f64 {
    match (x.dims4(), w.dims4()) {
        (Ok((b, _, h, wd)), Ok((cout, cin, kh, kw))) => {
            let out = |i: usize, k: usize| (i + 2 * cfg.padding).saturating_sub(k) / cfg.stride.max(1) + 1;
            2.0 * (b * cout * out(h, kh) * out(wd, kw) * cin * kh * kw) as f64
        }
        _ => 0.0,
    }
}

fn add_adapters(mut y: Tensor, x: &Tensor, adapters: &[Arc<dyn Adapter>]) -> Result<Tensor> {
    for adapter in adapters {
        y = (y + adapter.forward(x)?)?;
    }
    Ok(y)
}

fn same_shape(path: &str, old: &Tensor, new: &Tensor) -> Result<()> {
    if old.dims() != new.dims() {
        candle_core::bail!("{path}: new weight has shape {:?}, expected {:?}", new.dims(), old.dims())
    }
    Ok(())
}

/// A mutable borrow of one addressable layer.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
}

impl LayerMut<'_> {
    pub fn path(&self) -> &str {
        match self {
            Self::Linear(l) => l.path(),
            Self::Conv2d(c) => c.path(),
        }
    }

    pub fn attach(&mut self, adapter: Arc<dyn Adapter>) {
        match self {
            Self::Linear(l) => l.attach(adapter),
            Self::Conv2d(c) => c.attach(adapter),
        }
    }

    pub fn detach_all(&mut self) {
        match self {
            Self::Linear(l) => l.detach_all(),
            Self::Conv2d(c) => c.detach_all(),
        }
    }
}

/// Walks every addressable layer of a model, in module order.
pub trait VisitLayers {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>));

    /// The diffusers module paths of all addressable layers.
    fn layer_paths(&mut self) -> Vec<String> {
        let mut paths = vec![];
        self.visit_layers(&mut |layer| paths.push(layer.path().to_string()));
        paths
    }

    /// Attaches `adapter` to the layer at `path`.
    fn attach_adapter(&mut self, path: &str, adapter: Arc<dyn Adapter>) -> crate::Result<()> {
        let mut adapter = Some(adapter);
        self.visit_layers(&mut |mut layer| {
            if layer.path() == path
                && let Some(a) = adapter.take()
            {
                layer.attach(a);
            }
        });
        match adapter {
            None => Ok(()),
            Some(_) => Err(crate::DiffusionError::UnknownLayer(path.to_string())),
        }
    }

    /// Removes every adapter from every layer.
    fn detach_all_adapters(&mut self) {
        self.visit_layers(&mut |mut layer| layer.detach_all());
    }
}

impl VisitLayers for Linear {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::Linear(self))
    }
}

impl VisitLayers for Conv2d {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::Conv2d(self))
    }
}

impl<T: VisitLayers> VisitLayers for Option<T> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        if let Some(inner) = self {
            inner.visit_layers(f)
        }
    }
}

impl<T: VisitLayers> VisitLayers for Vec<T> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        for inner in self {
            inner.visit_layers(f)
        }
    }
}

/// Layer normalisation over the last dimension. Uses candle's fused kernel for inference, an op
/// with its own input gradient when only the input is tracked (LoRA training), and candle's
/// differentiable composition otherwise (the fused kernel has no backward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _p = crate::cpu::profile::scope("layer_norm");
        if !x.track_op() && !self.weight.track_op() {
            return candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32);
        }
        if let Some(y) = crate::cpu::norm_backward::layer_norm(x, &self.weight, &self.bias, self.eps)? {
            return Ok(y);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_sub(&mean)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        x.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Softmax over the last dimension: the fused kernel for inference, the differentiable
/// composition when gradients are tracked.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() { candle_nn::ops::softmax(x, D::Minus1) } else { candle_nn::ops::softmax_last_dim(x) }
}

/// The activations named by diffusers configs (`act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
}

impl Activation {
    /// Parses a diffusers activation name (`silu`, `swish`, `gelu`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _p = crate::cpu::profile::scope("activation");
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn linear_on_transposed_input_equals_linear_on_a_copy() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 64, 48), &dev).unwrap().transpose(1, 2).unwrap();
        let weights = [("weight".to_string(), Tensor::randn(0f32, 0.1, (32, 64), &dev).unwrap())].into_iter().collect();
        let vb = candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, &dev);
        let linear = super::Linear::new(vb, 64, 32, false).unwrap();
        let a = linear.forward(&x).unwrap();
        let b = x.contiguous().unwrap().broadcast_matmul(&linear.weight().t().unwrap()).unwrap();
        let err = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-5, "{err}");
    }
}
