//! One pre-norm causal transformer layer of the CLIP text encoders in a single pass over raw
//! buffers: layer norm, fused q/k/v product, causal attention, output projection plus residual,
//! layer norm, MLP with the activation fused into the first product and the residual into the
//! second. No intermediate tensors, transposes or copies; the weights are read in place.

use candle_core::{DType, Result, Storage, Tensor};

use super::causal_attention::causal_attention;
use super::layer_norm::layer_norm;
use super::linear_rows::{Segment, available, linear_rows};
use super::{f32_data, inference, profile};

pub use super::linear_rows::Act;

thread_local! {
    /// The intermediate buffers of [`encoder_layer`] on this thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The parameters of one layer (transformers' `CLIPEncoderLayer` names).
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights<'a> {
    /// `(weight, bias)` of `layer_norm1` and `layer_norm2`, with their epsilon.
    pub layer_norm1: (&'a Tensor, &'a Tensor),
    pub layer_norm2: (&'a Tensor, &'a Tensor),
    pub eps: f64,
    /// `(weight [out, in], bias [out])` of the projections.
    pub q_proj: (&'a Tensor, &'a Tensor),
    pub k_proj: (&'a Tensor, &'a Tensor),
    pub v_proj: (&'a Tensor, &'a Tensor),
    pub out_proj: (&'a Tensor, &'a Tensor),
    pub fc1: (&'a Tensor, &'a Tensor),
    pub fc2: (&'a Tensor, &'a Tensor),
    pub heads: usize,
    pub act: Act,
}

impl LayerWeights<'_> {
    fn tensors(&self) -> [&Tensor; 16] {
        let pairs = [
            self.layer_norm1,
            self.layer_norm2,
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.out_proj,
            self.fc1,
            self.fc2,
        ];
        std::array::from_fn(|i| if i % 2 == 0 { pairs[i / 2].0 } else { pairs[i / 2].1 })
    }
}

/// The layer's output for `x` `[B, N, C]` under the causal mask, or `None` where the fused path
/// does not apply (gradients tracked, not f32, not on the CPU, not contiguous, no AVX-512,
/// shapes other than the layer's): the caller then runs the plain composition.
pub fn encoder_layer(x: &Tensor, w: &LayerWeights<'_>) -> Result<Option<Tensor>> {
    let tensors = w.tensors();
    let mut all = vec![x];
    all.extend(tensors);
    if !available() || !inference(&all) || all.iter().any(|t| t.dtype() != DType::F32 || !t.is_contiguous()) {
        return Ok(None);
    }
    let Ok((b, n, c)) = x.dims3() else { return Ok(None) };
    let inter = w.fc1.1.elem_count();
    let expected: [&[usize]; 16] = [
        &[c],
        &[c],
        &[c],
        &[c],
        &[c, c],
        &[c],
        &[c, c],
        &[c],
        &[c, c],
        &[c],
        &[c, c],
        &[c],
        &[inter, c],
        &[inter],
        &[c, inter],
        &[c],
    ];
    if w.heads == 0 || !c.is_multiple_of(w.heads) || tensors.iter().zip(expected).any(|(t, e)| t.dims() != e) {
        return Ok(None);
    }
    let guards: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
    let data = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(cpu) => f32_data(cpu, l),
            _ => candle_core::bail!("text layer: expected CPU tensors"),
        })
        .collect::<Result<Vec<_>>>()?;
    let [x, ln1w, ln1b, ln2w, ln2b, qw, qb, kw, kb, vw, vb, ow, ob, f1w, f1b, f2w, f2b] = data[..] else {
        unreachable!("17 tensors")
    };
    let (rows, eps) = (b * n, w.eps as f32);
    // The intermediate buffers are kept from call to call (fresh large allocations are fresh
    // pages, whose faults cost about as much as the layer norms and the attention together).
    let mut scratch = SCRATCH.with_borrow_mut(std::mem::take);
    scratch.resize(scratch.len().max(rows * (5 * c + inter)), 0.0);
    let (h, rest) = scratch.split_at_mut(rows * c);
    let (qkv, rest) = rest.split_at_mut(rows * 3 * c);
    let (x1, rest) = rest.split_at_mut(rows * c);
    let m = &mut rest[..rows * inter];
    {
        let _p = profile::scope("text: layer_norm");
        layer_norm(x, ln1w, ln1b, eps, h);
    }
    {
        let _p = profile::scope_flops("text: q/k/v", 2.0 * (rows * c * 3 * c) as f64);
        let segments = [
            Segment { weight: qw, bias: qb, column: 0 },
            Segment { weight: kw, bias: kb, column: c },
            Segment { weight: vw, bias: vb, column: 2 * c },
        ];
        linear_rows(h, c, &segments, Act::None, None, qkv, 3 * c);
    }
    {
        let _p = profile::scope_flops("text: causal attention", 2.0 * (b * n * n * c) as f64);
        causal_attention(qkv, (b, n, c), w.heads, h);
    }
    {
        let _p = profile::scope_flops("text: out_proj + residual", 2.0 * (rows * c * c) as f64);
        linear_rows(h, c, &[Segment { weight: ow, bias: ob, column: 0 }], Act::None, Some(x), x1, c);
    }
    {
        let _p = profile::scope("text: layer_norm");
        layer_norm(x1, ln2w, ln2b, eps, h);
    }
    {
        let _p = profile::scope_flops("text: fc1 + act", 2.0 * (rows * c * inter) as f64);
        linear_rows(h, c, &[Segment { weight: f1w, bias: f1b, column: 0 }], w.act, None, m, inter);
    }
    let mut y = vec![0f32; rows * c];
    {
        let _p = profile::scope_flops("text: fc2 + residual", 2.0 * (rows * c * inter) as f64);
        linear_rows(m, inter, &[Segment { weight: f2w, bias: f2b, column: 0 }], Act::None, Some(x1), &mut y, c);
    }
    SCRATCH.set(scratch);
    Ok(Some(Tensor::from_vec(y, (b, n, c), &candle_core::Device::Cpu)?))
}
