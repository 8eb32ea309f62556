//! diffusers `attention_processor.Attention`, `attention.BasicTransformerBlock` and
//! `transformers/transformer_2d.Transformer2DModel` (the spatial transformer of the UNet).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::cpu::norm::GroupNorm;
use crate::layers::{LayerMut, LayerNorm, Linear, VisitLayers, softmax_last_dim};

/// Multi-head attention with `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
}

impl Attention {
    /// `context_dim` is the width of the keys/values' source (`query_dim` for self-attention).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::new(vb.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: Linear::new(vb.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
            upcast,
        })
    }

    /// `x` `[B, N, query_dim]`; `context` `[B, M, context_dim]` (`None`: self-attention).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let (q, k, v) = (self.to_q.forward(x)?, self.to_k.forward(context)?, self.to_v.forward(context)?);
        // Training on the CPU: one op on the token layout, heads split and merged inside.
        if q.track_op() || k.track_op() || v.track_op() {
            let kind = if q.dim(1)? == k.dim(1)? { "attend/self" } else { "attend/cross" };
            let p = crate::cpu::profile::scope_flops(kind, 4.0 * (q.elem_count() * k.dim(1)?) as f64);
            if let Some(out) = crate::cpu::attention_backward::attention(&q, &k, &v, self.heads, self.scale)? {
                drop(p);
                return self.to_out.forward(&out);
            }
        }
        let (q, k, v) = (self.split_heads(&q)?, self.split_heads(&k)?, self.split_heads(&v)?);
        let out = self.attend(&q, &k, &v)?;
        let (b, h, n, d) = out.dims4()?;
        self.to_out.forward(&out.transpose(1, 2)?.reshape((b, n, h * d))?)
    }

    /// `[B, N, H·d]` to `[B, H, N, d]` (a strided view: the CPU kernel reads it in place, the
    /// other paths copy).
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, inner) = x.dims3()?;
        x.reshape((b, n, self.heads, inner / self.heads))?.transpose(1, 2)
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let kind = if q.dim(2)? == k.dim(2)? { "attend/self" } else { "attend/cross" };
        let _p = crate::cpu::profile::scope_flops(kind, 4.0 * (q.elem_count() * k.dim(2)?) as f64);
        let dtype = q.dtype();
        #[cfg(feature = "flash-attn")]
        if q.device().is_cuda() && !q.track_op() {
            // FlashAttention-2 takes [B, N, H, d] in f16/bf16 (forward only, hence not when training).
            let half = if dtype == DType::BF16 { DType::BF16 } else { DType::F16 };
            let to = |t: &Tensor| t.transpose(1, 2)?.to_dtype(half)?.contiguous();
            let out = candle_flash_attn::flash_attn(&to(q)?, &to(k)?, &to(v)?, self.scale as f32, false)?;
            return out.transpose(1, 2)?.to_dtype(dtype);
        }
        let compute = if self.upcast || dtype == DType::BF16 || dtype == DType::F16 { DType::F32 } else { dtype };
        let (q, k, v) = (q.to_dtype(compute)?, k.to_dtype(compute)?, v.to_dtype(compute)?);
        if let Some(out) = crate::cpu::attention::attention(&q, &k, &v, self.scale)? {
            return out.to_dtype(dtype);
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        softmax_last_dim(&scores)?.matmul(&v)?.to_dtype(dtype)
    }
}

impl VisitLayers for Attention {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.to_q.visit_layers(f);
        self.to_k.visit_layers(f);
        self.to_v.visit_layers(f);
        self.to_out.visit_layers(f);
    }
}

/// diffusers `FeedForward` with the GEGLU activation: `net.0.proj` then `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::new(vb.pp("net.2"), inner, dim, true)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fused = match self.proj.adapters() {
            [] => crate::cpu::geglu::linear_geglu(x, self.proj.weight(), self.proj.bias())?,
            _ => None,
        };
        let h = match fused {
            Some(h) => h,
            None => crate::cpu::geglu::geglu(&self.proj.forward(x)?)?,
        };
        self.out.forward(&h)
    }
}

impl VisitLayers for FeedForward {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.proj.visit_layers(f);
        self.out.visit_layers(f);
    }
}

/// diffusers `BasicTransformerBlock` (`norm_type = "layer_norm"`): self-attention,
/// cross-attention and a GEGLU feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

/// Construction parameters shared by the transformer blocks of one [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

impl BasicTransformerBlock {
    pub fn new(vb: VarBuilder, dim: usize, cfg: &TransformerConfig) -> Result<Self> {
        let (h, d) = (cfg.heads, cfg.head_dim);
        let ctx = cfg.cross_attention_dim;
        let attn1_ctx = if cfg.only_cross_attention { ctx } else { dim };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, attn1_ctx, h, d, false, cfg.upcast_attention)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, ctx, h, d, false, cfg.upcast_attention)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
            only_cross_attention: cfg.only_cross_attention,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let attn1_ctx = self.only_cross_attention.then_some(context);
        let x = (self.attn1.forward(&self.norm1.forward(x)?, attn1_ctx)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

impl VisitLayers for BasicTransformerBlock {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.attn1.visit_layers(f);
        self.attn2.visit_layers(f);
        self.ff.visit_layers(f);
    }
}

/// `proj_in` / `proj_out`: 1×1 convolutions (SD1.x) or linear layers (`use_linear_projection`).
#[derive(Debug, Clone)]
enum Projection {
    Conv(crate::layers::Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, cin: usize, cout: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Self::Linear(Linear::new(vb, cin, cout, true)?)
        } else {
            Self::Conv(crate::layers::Conv2d::new(vb, cin, cout, 1, 1, 0)?)
        })
    }
}

impl VisitLayers for Projection {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        match self {
            Self::Conv(c) => c.visit_layers(f),
            Self::Linear(l) => l.visit_layers(f),
        }
    }
}

/// diffusers `Transformer2DModel` for continuous inputs: group norm, `proj_in`, the transformer
/// blocks over the `H·W` tokens, `proj_out`, residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, channels: usize, cfg: &TransformerConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let linear = cfg.use_linear_projection;
        let blocks = (0..cfg.layers)
            .map(|i| BasicTransformerBlock::new(vb.pp("transformer_blocks").pp(i), inner, cfg))
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), cfg.groups, channels, 1e-6)?,
            proj_in: Projection::new(vb.pp("proj_in"), channels, inner, linear)?,
            transformer_blocks: blocks,
            proj_out: Projection::new(vb.pp("proj_out"), inner, channels, linear)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        // 1×1 projections fold the layout change in (CPU kernel, no adapters attached).
        let pointwise = |conv: &crate::layers::Conv2d| {
            conv.adapters().is_empty() && conv.config().padding == 0 && conv.config().stride == 1
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) if pointwise(conv) => {
                match crate::cpu::pointwise::conv1x1_to_tokens(&normed, conv.weight(), conv.bias())? {
                    Some(t) => t,
                    None => to_tokens(&conv.forward(&normed)?)?,
                }
            }
            Projection::Conv(conv) => match conv.forward_tokens(&to_tokens(&normed)?)? {
                Some(t) => t,
                None => to_tokens(&conv.forward(&normed)?)?,
            },
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) if pointwise(conv) => {
                match crate::cpu::pointwise::conv1x1_from_tokens(&tokens, (h, w), conv.weight(), conv.bias())? {
                    Some(o) => o,
                    None => conv.forward(&to_map(&tokens)?)?,
                }
            }
            Projection::Conv(conv) => match conv.forward_tokens(&tokens)? {
                Some(t) => to_map(&t)?,
                None => conv.forward(&to_map(&tokens)?)?,
            },
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        out + x
    }
}

impl VisitLayers for Transformer2DModel {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.proj_in.visit_layers(f);
        self.transformer_blocks.visit_layers(f);
        self.proj_out.visit_layers(f);
    }
}
