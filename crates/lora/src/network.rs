//! The trainable LoRA network: one `down`/`up` pair of f32 `Var`s per target layer, attached to
//! the frozen models as [`LoraAdapter`]s, as kohya's `LoRANetwork` (which EasyPhoto trains).
//!
//! Targets: in the UNet every Linear and Conv2d inside a `Transformer2DModel` (`*.attentions.N`:
//! `proj_in`, `proj_out`, attention `to_q/k/v/out.0`, `ff.net.0.proj`, `ff.net.2`; 192 modules in
//! SD1.5), in the text encoders every Linear of the attention and MLP blocks (72 in CLIP-L).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Conv2dConfig;
use easyphoto_diffusion::LayerMut;
use rand::Rng;

use crate::apply::Slot;
use crate::{KohyaLora, KohyaModule, KohyaPrefix, LoraAdapter, LoraError, Targets, kohya_name};

/// One trained module.
#[derive(Debug, Clone)]
pub struct TrainedModule {
    /// Kohya name (`lora_unet_...`, `lora_te_...`).
    pub name: String,
    /// The model it adapts.
    pub slot: Slot,
    /// `[r, in (, kh, kw)]`.
    pub down: Var,
    /// `[out, r (, 1, 1)]`.
    pub up: Var,
    conv: Option<Conv2dConfig>,
}

/// The trainable LoRA of a UNet and its text encoders.
#[derive(Debug, Clone)]
pub struct LoraNetwork {
    modules: Vec<TrainedModule>,
    alpha: f32,
    sdxl: bool,
}

/// Whether the layer at `path` of the model in `slot` is a training target.
pub fn is_target(slot: Slot, path: &str) -> bool {
    match slot {
        Slot::Unet => path.contains(".attentions."),
        Slot::TextEncoder | Slot::TextEncoder2 => path.contains(".self_attn.") || path.contains(".mlp."),
    }
}

impl LoraNetwork {
    /// A fresh network of rank `rank` on every target of `targets`: `down` kaiming-uniform with
    /// a = √5 (uniform in ±1/√fan_in, as torch's `nn.Linear` default), `up` zero.
    pub fn new(targets: &mut Targets, rank: usize, alpha: f32, rng: &mut impl Rng) -> Result<Self, LoraError> {
        let sdxl = targets.text_encoder_2.is_some();
        let mut modules = vec![];
        let mut result = Ok(());
        visit_targets(targets, &mut |slot, path, weight, conv, device| {
            if result.is_err() {
                return;
            }
            let fan_in: usize = weight[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut down_shape = vec![rank];
            down_shape.extend_from_slice(&weight[1..]);
            let up_shape = if weight.len() == 4 { vec![weight[0], rank, 1, 1] } else { vec![weight[0], rank] };
            let n: usize = down_shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
            let made = (|| -> Result<TrainedModule, LoraError> {
                Ok(TrainedModule {
                    name: kohya_name(prefix_of(slot, sdxl), path),
                    slot,
                    down: Var::from_tensor(&Tensor::from_vec(values, down_shape, device)?)?,
                    up: Var::zeros(up_shape, DType::F32, device)?,
                    conv,
                })
            })();
            match made {
                Ok(m) => modules.push(m),
                Err(e) => result = Err(e),
            }
        });
        result?;
        Ok(Self { modules, alpha, sdxl })
    }

    /// A network on the same targets whose weights are taken from `lora` (every target must be
    /// in it); for resuming and for reproducing a reference step.
    pub fn from_lora(targets: &mut Targets, lora: &KohyaLora) -> Result<Self, LoraError> {
        let sdxl = targets.text_encoder_2.is_some();
        let mut modules = vec![];
        let mut alpha = None;
        let mut result = Ok(());
        visit_targets(targets, &mut |slot, path, _, conv, device| {
            if result.is_err() {
                return;
            }
            let name = kohya_name(prefix_of(slot, sdxl), path);
            let made = (|| -> Result<TrainedModule, LoraError> {
                let m = lora.get(&name).ok_or_else(|| LoraError::MissingDown { module: name.clone() })?;
                alpha = alpha.or(m.alpha);
                let var = |t: &Tensor| -> Result<Var, LoraError> {
                    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?)
                };
                Ok(TrainedModule { name: name.clone(), slot, down: var(&m.down)?, up: var(&m.up)?, conv })
            })();
            match made {
                Ok(m) => modules.push(m),
                Err(e) => result = Err(e),
            }
        });
        result?;
        let rank = modules.first().map_or(1, |m| m.down.dim(0).unwrap_or(1));
        Ok(Self { modules, alpha: alpha.unwrap_or(rank as f32), sdxl })
    }

    /// Attaches every module to its layer (`scale = multiplier · alpha / rank`).
    pub fn attach(&self, targets: &mut Targets, multiplier: f64) {
        let by_name: BTreeMap<&str, &TrainedModule> = self.modules.iter().map(|m| (m.name.as_str(), m)).collect();
        let sdxl = self.sdxl;
        targets.visit(&mut |slot, mut layer| {
            let name = kohya_name(prefix_of(slot, sdxl), layer.path());
            if let Some(m) = by_name.get(name.as_str()) {
                let scale = multiplier * f64::from(self.alpha) / m.down.dim(0).unwrap_or(1) as f64;
                let (down, up) = (m.down.as_tensor().clone(), m.up.as_tensor().clone());
                let adapter = match m.conv {
                    Some(c) => LoraAdapter::conv(down, up, scale, c),
                    None => LoraAdapter::linear(down, up, scale),
                };
                layer.attach(Arc::new(adapter));
            }
        });
    }

    /// The modules, in model order (UNet first).
    pub fn modules(&self) -> &[TrainedModule] {
        &self.modules
    }

    /// The network alpha.
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// The current weights as a kohya LoRA (f32; save it in f16 as EasyPhoto does).
    pub fn to_lora(&self, metadata: BTreeMap<String, String>) -> KohyaLora {
        let modules = self
            .modules
            .iter()
            .map(|m| {
                let module = KohyaModule {
                    down: m.down.as_tensor().clone(),
                    up: m.up.as_tensor().clone(),
                    alpha: Some(self.alpha),
                };
                (m.name.clone(), module)
            })
            .collect();
        KohyaLora::new("trained LoRA", modules, metadata)
    }
}

fn prefix_of(slot: Slot, sdxl: bool) -> KohyaPrefix {
    match (slot, sdxl) {
        (Slot::Unet, _) => KohyaPrefix::Unet,
        (Slot::TextEncoder, false) => KohyaPrefix::TextEncoder,
        (Slot::TextEncoder, true) => KohyaPrefix::TextEncoder1,
        (Slot::TextEncoder2, _) => KohyaPrefix::TextEncoder2,
    }
}

/// Called with the model, path, weight shape, conv config (None for a Linear) and device.
type TargetFn<'a> = dyn FnMut(Slot, &str, &[usize], Option<Conv2dConfig>, &Device) + 'a;

/// Calls `f` for every target layer.
fn visit_targets(targets: &mut Targets, f: &mut TargetFn) {
    targets.visit(&mut |slot, layer| {
        if !is_target(slot, layer.path()) {
            return;
        }
        match &layer {
            LayerMut::Linear(l) => f(slot, l.path(), l.weight().dims(), None, l.weight().device()),
            LayerMut::Conv2d(c) => f(slot, c.path(), c.weight().dims(), Some(*c.config()), c.weight().device()),
        }
    });
}
