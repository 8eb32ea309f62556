//! Applying several LoRAs at once, each with its own multiplier, to a UNet and its text
//! encoders: merged into the weights (`W += Σ m · alpha/rank · up·down`, fast at inference; the
//! original weights are kept, so un-merging is exact) or attached at run time as
//! [`LoraAdapter`]s (hot-swap without reloading the base model). Both give the same outputs.
//!
//! Every module is resolved against the models' own layer paths. Modules that match no layer,
//! and file keys that are no LoRA tensors, are listed in the [`LoraReport`]; a LoRA for another
//! base family, or a module whose shape does not fit its layer, is refused before any weight
//! changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use easyphoto_diffusion::{LayerMut, VisitLayers};

use crate::{
    BaseFamily, KohyaLora, KohyaPrefix, LoraAdapter, LoraError, ModuleIndex, lora_family, lora_scale, scaled_product,
};

/// The models LoRAs are applied to; any may be absent (its modules are then unmatched).
#[derive(Default)]
pub struct Targets<'a> {
    /// The UNet (`lora_unet_`, `unet.`).
    pub unet: Option<&'a mut dyn VisitLayers>,
    /// The (first) text encoder (`lora_te_`, `lora_te1_`, `text_encoder.`).
    pub text_encoder: Option<&'a mut dyn VisitLayers>,
    /// SDXL's second text encoder (`lora_te2_`, `text_encoder_2.`).
    pub text_encoder_2: Option<&'a mut dyn VisitLayers>,
}

/// One of the models of [`Targets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Slot {
    const ALL: [Self; 3] = [Self::Unet, Self::TextEncoder, Self::TextEncoder2];

    /// The model a kohya prefix adapts (`lora_te` and `lora_te1` both mean the first encoder).
    pub fn of(prefix: KohyaPrefix) -> Self {
        match prefix {
            KohyaPrefix::Unet => Self::Unet,
            KohyaPrefix::TextEncoder | KohyaPrefix::TextEncoder1 => Self::TextEncoder,
            KohyaPrefix::TextEncoder2 => Self::TextEncoder2,
        }
    }

    fn prefixes(self) -> &'static [KohyaPrefix] {
        match self {
            Self::Unet => &[KohyaPrefix::Unet],
            Self::TextEncoder => &[KohyaPrefix::TextEncoder, KohyaPrefix::TextEncoder1],
            Self::TextEncoder2 => &[KohyaPrefix::TextEncoder2],
        }
    }
}

/// What became of one LoRA.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraReport {
    /// The LoRA's file.
    pub file: String,
    /// Modules applied.
    pub applied: usize,
    /// Kohya names of modules that match no layer of the given models.
    pub unmatched: Vec<String>,
    /// Keys of the file that are no LoRA down/up/alpha tensors.
    pub unsupported_keys: Vec<String>,
}

impl LoraReport {
    /// `Err(Unmatched)` listing the unmatched modules and unsupported keys, if there are any.
    pub fn ensure_complete(&self) -> Result<(), LoraError> {
        let names: Vec<String> = self.unmatched.iter().chain(&self.unsupported_keys).cloned().collect();
        if names.is_empty() { Ok(()) } else { Err(LoraError::Unmatched { file: self.file.clone(), names }) }
    }
}

/// One LoRA module resolved to a layer: `down`, `up`, and `multiplier · alpha / rank`.
struct Part {
    down: Tensor,
    up: Tensor,
    scale: f64,
}

type Plan = BTreeMap<(Slot, String), Vec<Part>>;

/// The weight shape of every layer, by model and path.
type Shapes = HashMap<(Slot, String), Vec<usize>>;

impl<'a> Targets<'a> {
    fn model(&mut self, slot: Slot) -> Option<&mut (dyn VisitLayers + 'a)> {
        match slot {
            Slot::Unet => self.unet.as_deref_mut(),
            Slot::TextEncoder => self.text_encoder.as_deref_mut(),
            Slot::TextEncoder2 => self.text_encoder_2.as_deref_mut(),
        }
    }

    /// Visits the layers of every present model.
    pub(crate) fn visit(&mut self, f: &mut dyn FnMut(Slot, LayerMut<'_>)) {
        for slot in Slot::ALL {
            if let Some(model) = self.model(slot) {
                model.visit_layers(&mut |layer| f(slot, layer));
            }
        }
    }

    /// Kohya names of every layer of the present models, and each layer's weight shape.
    pub fn module_index(&mut self) -> Result<ModuleIndex, LoraError> {
        Ok(self.layers()?.0)
    }

    fn layers(&mut self) -> Result<(ModuleIndex, Shapes), LoraError> {
        let mut shapes = HashMap::new();
        self.visit(&mut |slot, layer| {
            let dims = match &layer {
                LayerMut::Linear(l) => l.weight().dims().to_vec(),
                LayerMut::Conv2d(c) => c.weight().dims().to_vec(),
            };
            shapes.insert((slot, layer.path().to_string()), dims);
        });
        let mut index = ModuleIndex::new();
        for slot in Slot::ALL {
            let paths: Vec<&str> = shapes.keys().filter(|(s, _)| *s == slot).map(|(_, p)| p.as_str()).collect();
            for &prefix in slot.prefixes() {
                index.add(prefix, paths.iter().copied())?;
                if slot == Slot::Unet {
                    for (alias, path) in crate::sgm_names::sgm_aliases(&paths) {
                        index.add_alias(prefix, &alias, path.to_string())?;
                    }
                } else {
                    for path in &paths {
                        if let Some(short) = path.strip_prefix("text_model.") {
                            index.add_alias(prefix, short, path.to_string())?;
                        }
                    }
                }
            }
        }
        Ok((index, shapes))
    }

    /// The family of the UNet, from the input width of its cross-attention key projections.
    pub fn family(&mut self) -> Option<BaseFamily> {
        let mut family = None;
        if let Some(unet) = self.unet.as_deref_mut() {
            unet.visit_layers(&mut |layer| {
                if let LayerMut::Linear(l) = layer
                    && l.path().ends_with("attn2.to_k")
                    && family.is_none()
                {
                    family = l.weight().dim(1).ok().and_then(BaseFamily::from_cross_attention_dim);
                }
            });
        }
        family
    }

    /// Resolves every module of `loras` to a layer and checks families and shapes.
    fn plan(&mut self, loras: &[(&KohyaLora, f64)]) -> Result<(Plan, Vec<LoraReport>), LoraError> {
        let (index, shapes) = self.layers()?;
        let model_family = self.family();
        let mut plan = Plan::new();
        let mut reports = vec![];
        for &(lora, multiplier) in loras {
            if let (Some(model), Some((family, evidence))) = (model_family, lora_family(lora))
                && model != family
            {
                return Err(LoraError::WrongBase { file: lora.file().into(), lora: family, model, evidence });
            }
            let mut report = LoraReport {
                file: lora.file().into(),
                applied: 0,
                unmatched: vec![],
                unsupported_keys: lora.unsupported_keys().to_vec(),
            };
            for (name, m) in lora.modules() {
                let Ok((prefix, path)) = index.resolve(name) else {
                    report.unmatched.push(name.to_string());
                    continue;
                };
                let key = (Slot::of(prefix), path.to_string());
                let weight = &shapes[&key];
                let Some((down, up)) = fit(&m.down, &m.up, weight)? else {
                    let mut delta = vec![m.up.dim(0)?];
                    delta.extend_from_slice(&m.down.dims()[1..]);
                    return Err(LoraError::ModuleShape {
                        file: lora.file().into(),
                        module: name.into(),
                        weight: weight.clone(),
                        delta,
                    });
                };
                let scale = multiplier * lora_scale(m.alpha, m.rank());
                plan.entry(key).or_default().push(Part { down, up, scale });
                report.applied += 1;
            }
            reports.push(report);
        }
        Ok((plan, reports))
    }
}

/// `down` and `up` shaped for a layer with weight shape `weight` (a Linear pair on a 1×1 conv, or
/// a 1×1 conv pair on a Linear, is reshaped), or `None` when their product cannot have that shape.
fn fit(down: &Tensor, up: &Tensor, weight: &[usize]) -> Result<Option<(Tensor, Tensor)>, LoraError> {
    let (r, out) = (down.dim(0)?, up.dim(0)?);
    let (down, up) = match (weight, down.dims()) {
        ([_, _], [_, input, 1, 1]) => (down.reshape((r, *input))?, up.reshape((out, r))?),
        ([_, _, 1, 1], [_, input]) => (down.reshape((r, *input, 1, 1))?, up.reshape((out, r, 1, 1))?),
        _ => (down.clone(), up.clone()),
    };
    let mut delta = vec![out];
    delta.extend_from_slice(&down.dims()[1..]);
    Ok((delta == weight).then_some((down, up)))
}

/// The weights [`merge`] replaced, to restore them exactly.
#[derive(Debug, Default)]
pub struct Merged {
    originals: BTreeMap<(Slot, String), Tensor>,
}

impl Merged {
    /// Puts the original weights back (bit-exact).
    pub fn unmerge(self, targets: &mut Targets) -> Result<(), LoraError> {
        let mut originals = self.originals;
        let mut result = Ok(());
        targets.visit(&mut |slot, layer| {
            if let Some(w) = originals.remove(&(slot, layer.path().to_string())) {
                let set = match layer {
                    LayerMut::Linear(l) => l.set_weight(w),
                    LayerMut::Conv2d(c) => c.set_weight(w),
                };
                if let Err(e) = set
                    && result.is_ok()
                {
                    result = Err(e.into());
                }
            }
        });
        result
    }
}

/// Merges `loras` (each with its multiplier) into the weights of `targets`:
/// `W' = W + Σ multiplier · alpha/rank · up·down`, summed in f32 and stored in the weight's dtype.
/// The merged weights are computed in parallel over modules before any layer changes.
pub fn merge(targets: &mut Targets, loras: &[(&KohyaLora, f64)]) -> Result<(Merged, Vec<LoraReport>), LoraError> {
    use rayon::prelude::*;
    let (plan, reports) = targets.plan(loras)?;
    let mut weights = Vec::with_capacity(plan.len());
    targets.visit(&mut |slot, layer| {
        let key = (slot, layer.path().to_string());
        if plan.contains_key(&key) {
            weights.push((key, layer_weight(&layer).clone()));
        }
    });
    // With enough modules, one single-threaded product per module beats splitting each product.
    let per_module = weights.len() >= 4 * rayon::current_num_threads();
    // The merged weights' buffers are allocated here, on the calling thread, so that after an
    // un-merge they return to the heap the next merge allocates from (allocated on rayon's
    // threads, they come from other arenas and fresh pages fault in again).
    let buffers: Vec<Vec<f32>> = weights
        .iter()
        .map(|(_, w)| if w.device().is_cpu() { Vec::with_capacity(w.elem_count()) } else { Vec::new() })
        .collect();
    let sums = weights
        .par_iter()
        .zip(buffers)
        .map(|((key, weight), buffer)| Ok((key.clone(), merged_weight(weight, &plan[key], !per_module, buffer)?)))
        .collect::<Result<BTreeMap<_, _>, LoraError>>()?;
    drop(weights);
    let mut merged = Merged::default();
    let mut result = Ok(());
    targets.visit(&mut |slot, layer| {
        let key = (slot, layer.path().to_string());
        let Some(sum) = sums.get(&key) else { return };
        if result.is_err() {
            return;
        }
        let original = layer_weight(&layer).clone();
        result = match layer {
            LayerMut::Linear(l) => l.set_weight(sum.clone()),
            LayerMut::Conv2d(c) => c.set_weight(sum.clone()),
        }
        .map_err(LoraError::from);
        if result.is_ok() {
            merged.originals.insert(key, original);
        }
    });
    match result {
        Ok(()) => Ok((merged, reports)),
        Err(e) => {
            merged.unmerge(targets)?;
            Err(e)
        }
    }
}

/// The weight of a Linear or Conv2d layer.
fn layer_weight<'a>(layer: &'a LayerMut<'_>) -> &'a Tensor {
    match layer {
        LayerMut::Linear(l) => l.weight(),
        LayerMut::Conv2d(c) => c.weight(),
    }
}

/// `weight + Σ scale · up·down`, accumulated in f32 and returned in the weight's dtype. On the
/// CPU each product is added by the rank-update kernel (the first one reading the original
/// weight in place and writing the merged copy into `buffer`), split over rayon's threads when
/// `split` is set.
fn merged_weight(weight: &Tensor, parts: &[Part], split: bool, mut buffer: Vec<f32>) -> Result<Tensor, LoraError> {
    use easyphoto_diffusion::cpu::rank_update::{add_product_in_place, add_product_into};
    if !weight.device().is_cpu() {
        let mut sum = weight.to_dtype(DType::F32)?;
        for p in parts {
            sum = (sum + scaled_product(&p.down, &p.up, p.scale)?)?;
        }
        return Ok(sum.to_dtype(weight.dtype())?);
    }
    let out = weight.dim(0)?;
    let inner = weight.elem_count() / out.max(1);
    let original = weight.to_dtype(DType::F32)?.contiguous()?;
    for (i, p) in parts.iter().enumerate() {
        let r = p.down.dim(0)?;
        let up: Vec<f32> = p.up.to_dtype(DType::F32)?.affine(p.scale, 0.0)?.flatten_all()?.to_vec1()?;
        let down: Vec<f32> = p.down.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if up.len() != out * r || down.len() != r * inner {
            return Err(LoraError::Layout { down: p.down.dims().to_vec(), up: p.up.dims().to_vec() });
        }
        let sizes = (out, inner, r);
        if i == 0 {
            easyphoto_diffusion::cpu::with_f32s([&original], |[w]| {
                add_product_into(&mut buffer, w, &up, &down, sizes, split);
                Ok(())
            })?;
        } else {
            add_product_in_place(&mut buffer, &up, &down, sizes, split);
        }
    }
    let merged = if parts.is_empty() { original } else { Tensor::from_vec(buffer, weight.dims(), weight.device())? };
    Ok(merged.to_dtype(weight.dtype())?)
}

/// Attaches `loras` (each with its multiplier) to `targets` as run-time [`LoraAdapter`]s, in the
/// dtype of each layer's weight. [`detach`] removes them.
pub fn attach(targets: &mut Targets, loras: &[(&KohyaLora, f64)]) -> Result<Vec<LoraReport>, LoraError> {
    let (plan, reports) = targets.plan(loras)?;
    let mut result = Ok(());
    targets.visit(&mut |slot, mut layer| {
        let Some(parts) = plan.get(&(slot, layer.path().to_string())) else { return };
        let mut build = || -> Result<(), LoraError> {
            for p in parts {
                let adapter = match &layer {
                    LayerMut::Linear(l) => {
                        let dtype = l.weight().dtype();
                        LoraAdapter::linear(p.down.to_dtype(dtype)?, p.up.to_dtype(dtype)?, p.scale)
                    }
                    LayerMut::Conv2d(c) => {
                        let dtype = c.weight().dtype();
                        LoraAdapter::conv(p.down.to_dtype(dtype)?, p.up.to_dtype(dtype)?, p.scale, *c.config())
                    }
                };
                layer.attach(Arc::new(adapter));
            }
            Ok(())
        };
        if result.is_ok() {
            result = build();
        }
    });
    match result {
        Ok(()) => Ok(reports),
        Err(e) => {
            detach(targets);
            Err(e)
        }
    }
}

/// Removes every adapter from every layer of `targets`.
pub fn detach(targets: &mut Targets) {
    for slot in Slot::ALL {
        if let Some(model) = targets.model(slot) {
            model.detach_all_adapters();
        }
    }
}
