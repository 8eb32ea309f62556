//! transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`: the text encoders of SD1.x
//! (CLIP ViT-L/14), SD2.x (OpenCLIP ViT-H/14) and SDXL (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14).
//!
//! Parameters and layers have transformers' paths (`text_model.encoder.layers.0.self_attn.q_proj`,
//! `text_model.encoder.layers.0.mlp.fc1`, `text_projection`), so LoRA files address them directly.
//!
//! ```no_run
//! use easyphoto_diffusion::diffusers_folder::load_clip_text_model;
//! # fn main() -> easyphoto_diffusion::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let clip = load_clip_text_model("sd15/text_encoder".as_ref(), None, candle_core::DType::F32, &device)?;
//! let ids = candle_core::Tensor::zeros((1, 77), candle_core::DType::U32, &device)?;
//! let context = clip.forward(&ids)?.last_hidden_state;
//! // "clip skip 2": the final norm on the penultimate layer; the last layer is not computed
//! let layers = clip.config().num_hidden_layers;
//! let skipped = clip.final_layer_norm(&clip.hidden_state(&ids, layers - 1)?)?;
//! # Ok(()) }
//! ```

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::cpu::text_layer;
use crate::error::{DiffusionError, Result};
use crate::layers::{LayerMut, LayerNorm, Linear, VisitLayers, softmax_last_dim};
use crate::unet_2d_condition::ConfigIssue;

/// transformers' `CLIPTextConfig` (a text encoder's `config.json`), with its field names and
/// defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CLIPTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Output width of `text_projection` (used by [`CLIPTextModelWithProjection`] only).
    pub projection_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu` (OpenCLIP ViT-H and bigG).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub bos_token_id: Option<u32>,
    /// Selects the pooled position: `2` (the value in SD1.x / SD2.x / SDXL configs) pools at the
    /// highest id of each row, any other value at its first occurrence.
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl Default for CLIPTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: Some(512),
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
            pad_token_id: Some(1),
        }
    }
}

impl CLIPTextConfig {
    /// Checks the config against what this crate implements.
    pub fn validate(&self) -> std::result::Result<(), ConfigIssue> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err((field, "must be positive".into()));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            let message = format!("{} heads do not divide hidden_size {}", self.num_attention_heads, self.hidden_size);
            return Err(("num_attention_heads", message));
        }
        HiddenAct::from_name(&self.hidden_act)
            .ok_or_else(|| ("hidden_act", format!("unsupported activation {}", self.hidden_act)))?;
        Ok(())
    }
}

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HiddenAct {
    QuickGelu,
    Gelu,
}

impl HiddenAct {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }
}

impl Module for HiddenAct {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
        }
    }
}

/// Multi-head self-attention with `q_proj`, `k_proj`, `v_proj`, `out_proj`.
#[derive(Debug, Clone)]
struct CLIPAttention {
    k_proj: Linear,
    v_proj: Linear,
    q_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl CLIPAttention {
    fn new(vb: VarBuilder, c: &CLIPTextConfig) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            k_proj: Linear::new(vb.pp("k_proj"), h, h, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), h, h, true)?,
            q_proj: Linear::new(vb.pp("q_proj"), h, h, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), h, h, true)?,
            heads: c.num_attention_heads,
            scale: ((h / c.num_attention_heads) as f64).powf(-0.5),
        })
    }

    /// `x` `[B, N, C]`; `mask` `[N, N]` float32, added to the scores.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, n, self.heads, c / self.heads))?.transpose(1, 2)?.contiguous();
        let dtype = x.dtype();
        let compute = if dtype == DType::F16 || dtype == DType::BF16 { DType::F32 } else { dtype };
        let q = split(self.q_proj.forward(x)?)?.to_dtype(compute)?;
        let k = split(self.k_proj.forward(x)?)?.to_dtype(compute)?;
        let v = split(self.v_proj.forward(x)?)?.to_dtype(compute)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&mask.to_dtype(compute)?)?;
        let out = softmax_last_dim(&scores)?.matmul(&v)?.to_dtype(dtype)?;
        self.out_proj.forward(&out.transpose(1, 2)?.reshape((b, n, c))?)
    }
}

/// transformers' `CLIPEncoderLayer`: pre-norm self-attention and MLP, each residual.
#[derive(Debug, Clone)]
struct CLIPEncoderLayer {
    self_attn: CLIPAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: HiddenAct,
    layer_norm2: LayerNorm,
}

impl CLIPEncoderLayer {
    fn new(vb: VarBuilder, c: &CLIPTextConfig, act: HiddenAct) -> candle_core::Result<Self> {
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            self_attn: CLIPAttention::new(vb.pp("self_attn"), c)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), h, eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), h, c.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), c.intermediate_size, h, true)?,
            act,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), h, eps)?,
        })
    }

    /// `mask` is the causal mask of `x`'s length ([`causal_mask`]).
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.fused(x)? {
            return Ok(y);
        }
        let x = (self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)? + x)?;
        let h = self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?;
        self.fc2.forward(&h)? + x
    }

    /// The layer through the CPU kernel [`cpu::text_layer`], or `None` where it does not apply
    /// (also when an adapter is attached to any of the projections).
    fn fused(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let a = &self.self_attn;
        let linears = [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &self.fc1, &self.fc2];
        if linears.iter().any(|l| !l.adapters().is_empty()) {
            return Ok(None);
        }
        let Some(params) = linears.iter().map(|l| l.bias().map(|b| (l.weight(), b))).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let [q_proj, k_proj, v_proj, out_proj, fc1, fc2] = params[..] else { unreachable!("six projections") };
        let weights = text_layer::LayerWeights {
            layer_norm1: (self.layer_norm1.weight(), self.layer_norm1.bias()),
            layer_norm2: (self.layer_norm2.weight(), self.layer_norm2.bias()),
            eps: self.layer_norm1.eps(),
            q_proj,
            k_proj,
            v_proj,
            out_proj,
            fc1,
            fc2,
            heads: a.heads,
            act: match self.act {
                HiddenAct::QuickGelu => text_layer::Act::QuickGelu,
                HiddenAct::Gelu => text_layer::Act::Gelu,
            },
        };
        text_layer::encoder_layer(x, &weights)
    }
}

impl VisitLayers for CLIPEncoderLayer {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        let a = &mut self.self_attn;
        for linear in [&mut a.k_proj, &mut a.v_proj, &mut a.q_proj, &mut a.out_proj, &mut self.fc1, &mut self.fc2] {
            linear.visit_layers(f);
        }
    }
}

/// The outputs of [`CLIPTextModel::forward`].
#[derive(Debug, Clone)]
pub struct CLIPTextOutput {
    /// `[B, N, C]`: the last layer's output after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// `[B, C]`: `last_hidden_state` at each row's end token (see
    /// [`CLIPTextConfig::eos_token_id`]).
    pub pooler_output: Tensor,
    /// `num_hidden_layers + 1` tensors `[B, N, C]`: the embeddings, then each layer's output
    /// (no final norm). SDXL uses `hidden_states[num_hidden_layers - 1]`.
    pub hidden_states: Vec<Tensor>,
}

/// transformers' `CLIPTextModel`: token and position embeddings, causal pre-norm transformer
/// layers, final layer norm, pooling at the end token.
#[derive(Debug, Clone)]
pub struct CLIPTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<CLIPEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: CLIPTextConfig,
}

impl CLIPTextModel {
    /// Loads the model from the `text_model.` tensors of `vb`.
    pub fn new(vb: VarBuilder, config: &CLIPTextConfig) -> Result<Self> {
        config.validate().map_err(|(field, message)| DiffusionError::config("CLIP text config", field, message))?;
        let act = HiddenAct::from_name(&config.hidden_act).unwrap_or(HiddenAct::QuickGelu);
        let vb = vb.pp("text_model");
        let (h, emb) = (config.hidden_size, vb.pp("embeddings"));
        let layers = (0..config.num_hidden_layers)
            .map(|i| CLIPEncoderLayer::new(vb.pp("encoder.layers").pp(i), config, act))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            token_embedding: emb.get((config.vocab_size, h), "token_embedding.weight")?,
            position_embedding: emb.get((config.max_position_embeddings, h), "position_embedding.weight")?,
            layers,
            final_layer_norm: LayerNorm::new(vb.pp("final_layer_norm"), h, config.layer_norm_eps)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &CLIPTextConfig {
        &self.config
    }

    /// Runs all layers on token ids `[B, N]` (`N <= max_position_embeddings`).
    pub fn forward(&self, input_ids: &Tensor) -> Result<CLIPTextOutput> {
        let (rows, mut hidden_states, last) = self.run(input_ids, self.layers.len())?;
        let last_hidden_state = self.final_layer_norm(&last)?;
        hidden_states.push(last);
        let pooler_output = pool(&last_hidden_state, &eos_positions(&rows, self.config.eos_token_id))?;
        Ok(CLIPTextOutput { last_hidden_state, pooler_output, hidden_states })
    }

    /// `hidden_states[layer]` of [`CLIPTextModel::forward`] (0: the embeddings), computing only
    /// the first `layer` layers.
    pub fn hidden_state(&self, input_ids: &Tensor, layer: usize) -> Result<Tensor> {
        if layer > self.layers.len() {
            return Err(DiffusionError::input("layer", format!("{layer} > {} layers", self.layers.len())));
        }
        Ok(self.run(input_ids, layer)?.2)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.token_embedding.device()
    }

    /// `text_model.final_layer_norm`, for hidden states taken before the last layer.
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.final_layer_norm.forward(x)?)
    }

    /// Runs the embeddings and the first `layers` layers; returns the ids read back, the hidden
    /// states before the last one, and the last one.
    fn run(&self, input_ids: &Tensor, layers: usize) -> Result<(Vec<Vec<u32>>, Vec<Tensor>, Tensor)> {
        let rows = self.read_ids(input_ids)?;
        let (b, n) = input_ids.dims2()?;
        let device = self.token_embedding.device();
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, b * n, device)?;
        let tokens = self.token_embedding.index_select(&ids, 0)?.reshape((b, n, self.config.hidden_size))?;
        let mut x = tokens.broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?;
        let mask = causal_mask(n, device)?;
        let mut earlier = Vec::with_capacity(layers + 1);
        for layer in &self.layers[..layers] {
            let next = layer.forward(&x, &mask)?;
            earlier.push(std::mem::replace(&mut x, next));
        }
        Ok((rows, earlier, x))
    }

    /// Checks `input_ids` (integer `[B, N]`, ids below `vocab_size`) and reads it to the host.
    fn read_ids(&self, input_ids: &Tensor) -> Result<Vec<Vec<u32>>> {
        let c = &self.config;
        let bad = |message: String| DiffusionError::input("input_ids", message);
        let (b, n) =
            input_ids.dims2().map_err(|_| bad(format!("expected [batch, tokens], got {:?}", input_ids.dims())))?;
        if !input_ids.dtype().is_int() || b == 0 || n == 0 || n > c.max_position_embeddings {
            return Err(bad(format!(
                "expected integer ids [batch, 1..={}], got {:?} {:?}",
                c.max_position_embeddings,
                input_ids.dtype(),
                input_ids.dims()
            )));
        }
        let rows = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        rows.into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|id| u32::try_from(id).ok().filter(|&id| (id as usize) < c.vocab_size))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| bad(format!("token id outside the vocabulary (0..{})", c.vocab_size)))
            })
            .collect()
    }
}

impl VisitLayers for CLIPTextModel {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.layers.visit_layers(f);
    }
}

/// `[N, N]`: 0 on and below the diagonal, -inf above (a token sees itself and earlier tokens).
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (n, n), device)?)
}

/// The pooled position of each row, as transformers picks it: with the pre-2023 config value
/// `eos_token_id == 2`, the first highest id (the end token of the CLIP tokenizer); otherwise the
/// first `eos_token_id` (position 0 when there is none).
fn eos_positions(rows: &[Vec<u32>], eos_token_id: Option<u32>) -> Vec<usize> {
    rows.iter()
        .map(|row| match eos_token_id {
            Some(2) => row.iter().enumerate().fold(0, |best, (i, &id)| if id > row[best] { i } else { best }),
            eos => row.iter().position(|&id| Some(id) == eos).unwrap_or(0),
        })
        .collect()
}

/// `x[b, positions[b]]` for `x` `[B, N, C]`: `[B, C]`.
fn pool(x: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let index: Vec<u32> = positions.iter().enumerate().map(|(row, &p)| (row * n + p) as u32).collect();
    Ok(x.reshape((b * n, c))?.index_select(&Tensor::new(index, x.device())?, 0)?)
}

/// The outputs of [`CLIPTextModelWithProjection::forward`].
#[derive(Debug, Clone)]
pub struct CLIPTextModelOutput {
    /// `[B, projection_dim]`: `text_projection` of the pooled output (SDXL's `text_embeds`).
    pub text_embeds: Tensor,
    pub last_hidden_state: Tensor,
    pub pooler_output: Tensor,
    pub hidden_states: Vec<Tensor>,
}

/// transformers' `CLIPTextModelWithProjection`: [`CLIPTextModel`] plus a bias-free
/// `text_projection` of the pooled output.
#[derive(Debug, Clone)]
pub struct CLIPTextModelWithProjection {
    text_model: CLIPTextModel,
    text_projection: Linear,
}

impl CLIPTextModelWithProjection {
    /// Loads the model from the `text_model.` and `text_projection.` tensors of `vb`; the config
    /// needs `projection_dim`.
    pub fn new(vb: VarBuilder, config: &CLIPTextConfig) -> Result<Self> {
        let projection_dim = config.projection_dim.ok_or_else(|| {
            DiffusionError::config("CLIP text config", "projection_dim", "required by CLIPTextModelWithProjection")
        })?;
        Ok(Self {
            text_model: CLIPTextModel::new(vb.clone(), config)?,
            text_projection: Linear::new(vb.pp("text_projection"), config.hidden_size, projection_dim, false)?,
        })
    }

    /// The model without the projection, for [`CLIPTextModel::hidden_state`] and the config.
    pub fn text_model(&self) -> &CLIPTextModel {
        &self.text_model
    }

    /// Runs all layers and the projection on token ids `[B, N]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<CLIPTextModelOutput> {
        let out = self.text_model.forward(input_ids)?;
        Ok(CLIPTextModelOutput {
            text_embeds: self.text_projection.forward(&out.pooler_output)?,
            last_hidden_state: out.last_hidden_state,
            pooler_output: out.pooler_output,
            hidden_states: out.hidden_states,
        })
    }
}

impl VisitLayers for CLIPTextModelWithProjection {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        self.text_model.visit_layers(f);
        self.text_projection.visit_layers(f);
    }
}

/// The stored key of a transformers CLIP tensor `name` under `prefix`: with the `text_model.`
/// level when present, else without it (`CLIPTextModel` saved by transformers >= 5.6, some old
/// SD1 checkpoints). A key found in neither form is returned as
/// requested, so that it is reported missing under its usual name.
pub(crate) fn stored_key(contains: impl Fn(&str) -> bool, prefix: &str, name: &str) -> String {
    let full = format!("{prefix}{name}");
    if contains(&full) {
        return full;
    }
    match name.strip_prefix("text_model.").map(|rest| format!("{prefix}{rest}")) {
        Some(flat) if contains(&flat) => flat,
        _ => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_eos_id_pools_at_the_highest_id() {
        let rows = vec![vec![98, 2, 5, 99, 99, 99], vec![98, 7, 2, 3, 4, 99]];
        assert_eq!(eos_positions(&rows, Some(2)), vec![3, 5]);
    }

    #[test]
    fn other_eos_ids_pool_at_their_first_occurrence() {
        let rows = vec![vec![98, 5, 99, 7, 99, 0], vec![98, 99, 4, 0, 0, 0], vec![98, 1, 2, 3, 0, 0]];
        assert_eq!(eos_positions(&rows, Some(7)), vec![3, 0, 0]);
        assert_eq!(eos_positions(&rows, Some(99)), vec![2, 1, 0]);
        assert_eq!(eos_positions(&rows, None), vec![0, 0, 0]);
    }

    #[test]
    fn stored_key_prefers_the_text_model_level() {
        let keys = ["p.text_model.a", "p.b", "p.text_model.b"];
        let contains = |k: &str| keys.contains(&k);
        assert_eq!(stored_key(contains, "p.", "text_model.a"), "p.text_model.a");
        assert_eq!(stored_key(contains, "p.", "text_model.b"), "p.text_model.b");
        let flat = ["p.c"];
        assert_eq!(stored_key(|k: &str| flat.contains(&k), "p.", "text_model.c"), "p.c");
        assert_eq!(stored_key(|k: &str| flat.contains(&k), "p.", "text_model.d"), "p.text_model.d");
    }
}
