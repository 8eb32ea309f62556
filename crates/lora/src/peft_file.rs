//! diffusers / peft LoRA files: `<component>.<module path>.lora_A.weight` (= kohya `lora_down`) and
//! `.lora_B.weight` (= `lora_up`), components `unet`, `text_encoder`, `text_encoder_2`. Alpha is no
//! tensor: it is `lora_alpha` (with per-module `alpha_pattern`) of the peft `LoraConfig`, stored by
//! diffusers as JSON in the safetensors metadata key `lora_adapter_metadata` with keys prefixed by
//! the component (`unet.lora_alpha`), or given as peft's `adapter_config.json`; with neither,
//! alpha = rank (scale 1). Read into kohya names (`text_encoder` becomes `lora_te1` when the file
//! also has `text_encoder_2`, as in kohya's SDXL files, else `lora_te`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::kohya_file::{check_pair, deserialize, load_tensor, read, write_safetensors};
use crate::{KohyaLora, KohyaModule, KohyaPrefix, LoraError, ModuleIndex};

/// The safetensors metadata key under which diffusers stores the adapter configs.
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// The alpha part of a peft `LoraConfig` (`adapter_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftAlpha {
    /// `lora_alpha`: the alpha of every module not in `alpha_pattern`.
    pub lora_alpha: f32,
    /// `alpha_pattern`: module path (or a trailing part of it, on a `.` boundary) to alpha.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f32>,
}

impl PeftAlpha {
    /// The alpha of the module at `path`: the first pattern that is `path` or a `.`-bounded
    /// suffix of it (peft matches patterns as regexes; literal names are what diffusers writes).
    pub fn alpha_of(&self, path: &str) -> f32 {
        self.alpha_pattern
            .iter()
            .find(|(pattern, _)| path == pattern.as_str() || path.ends_with(&format!(".{pattern}")))
            .map_or(self.lora_alpha, |(_, &alpha)| alpha)
    }
}

/// A diffusers LoRA component: its key prefix and its kohya prefix.
const COMPONENTS: [(&str, KohyaPrefix); 3] = [
    ("unet", KohyaPrefix::Unet),
    ("text_encoder", KohyaPrefix::TextEncoder),
    ("text_encoder_2", KohyaPrefix::TextEncoder2),
];

/// Whether `bytes` look like a diffusers/peft LoRA (some key has `.lora_A.` or `.lora_B.`).
pub fn is_peft(keys: impl IntoIterator<Item = impl AsRef<str>>) -> bool {
    keys.into_iter().any(|k| k.as_ref().contains(".lora_A.") || k.as_ref().contains(".lora_B."))
}

/// Reads a diffusers/peft LoRA file. `config` (peft's `adapter_config.json`, for files saved by
/// peft without diffusers' metadata) gives the alphas of every component when the file has none.
pub fn load_peft(path: impl AsRef<Path>, config: Option<&PeftAlpha>, device: &Device) -> Result<KohyaLora, LoraError> {
    let path = path.as_ref();
    let bytes = read(path)?;
    peft_from_bytes(&bytes, &path.display().to_string(), config, device)
}

/// Parses the bytes of a diffusers/peft LoRA file; `file` names it in errors.
pub fn peft_from_bytes(
    bytes: &[u8],
    file: &str,
    config: Option<&PeftAlpha>,
    device: &Device,
) -> Result<KohyaLora, LoraError> {
    let (st, metadata) = deserialize(bytes, file)?;
    let alphas = component_alphas(&metadata, file)?;
    let sdxl = st.names().iter().any(|k| k.starts_with("text_encoder_2."));
    let mut parts: BTreeMap<(KohyaPrefix, String), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut unsupported = vec![];
    for (key, view) in st.iter() {
        let parsed = COMPONENTS.iter().rev().find_map(|&(component, prefix)| {
            let rest = key.strip_prefix(component)?.strip_prefix('.')?;
            let (path, is_down) = match (rest.strip_suffix(".lora_A.weight"), rest.strip_suffix(".lora_B.weight")) {
                (Some(path), _) => (path, true),
                (_, Some(path)) => (path, false),
                _ => return None,
            };
            let prefix = if prefix == KohyaPrefix::TextEncoder && sdxl { KohyaPrefix::TextEncoder1 } else { prefix };
            Some((component, prefix, path, is_down))
        });
        let Some((_, prefix, path, is_down)) = parsed else {
            unsupported.push(key.to_string());
            continue;
        };
        let tensor = load_tensor(&view, file, key, device)?;
        let entry = parts.entry((prefix, path.to_string())).or_default();
        if is_down { entry.0 = Some(tensor) } else { entry.1 = Some(tensor) }
    }
    let mut modules = BTreeMap::new();
    for ((prefix, path), (down, up)) in parts {
        // transformers 5 saves CLIP without the `text_model.` level that kohya names have.
        let kohya_path = match path.strip_prefix("encoder.") {
            Some(rest) if prefix != KohyaPrefix::Unet => format!("text_model.encoder.{rest}"),
            _ => path.clone(),
        };
        let name = crate::kohya_name(prefix, &kohya_path);
        let down = down.ok_or_else(|| LoraError::MissingDown { module: name.clone() })?;
        let up = up.ok_or_else(|| LoraError::MissingUp { module: name.clone() })?;
        check_pair(&name, &down, &up)?;
        let component = COMPONENTS.iter().find(|c| c.1 == prefix).map_or("text_encoder", |c| c.0);
        let alpha = alphas.get(component).or(config).map(|a| a.alpha_of(&path));
        modules.insert(name, KohyaModule { down, up, alpha });
    }
    Ok(KohyaLora::new(file, modules, metadata).with_unsupported(unsupported))
}

/// The per-component alpha configs of diffusers' `lora_adapter_metadata`.
fn component_alphas(metadata: &BTreeMap<String, String>, file: &str) -> Result<BTreeMap<String, PeftAlpha>, LoraError> {
    let Some(raw) = metadata.get(ADAPTER_METADATA_KEY) else { return Ok(BTreeMap::new()) };
    let bad = |reason: String| LoraError::Metadata { file: file.to_string(), key: ADAPTER_METADATA_KEY.into(), reason };
    let flat: BTreeMap<String, serde_json::Value> = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (component, _) in COMPONENTS {
        let field = |name: &str| flat.get(&format!("{component}.{name}"));
        let Some(alpha) = field("lora_alpha") else { continue };
        let lora_alpha = alpha.as_f64().ok_or_else(|| bad(format!("{component}.lora_alpha is not a number")))? as f32;
        let alpha_pattern = match field("alpha_pattern") {
            None | Some(serde_json::Value::Null) => BTreeMap::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| bad(format!("{component}.alpha_pattern: {e}")))?,
        };
        out.insert(component.to_string(), PeftAlpha { lora_alpha, alpha_pattern });
    }
    Ok(out)
}

/// Writes `lora` as a diffusers LoRA file (`unet.` / `text_encoder.` / `text_encoder_2.` keys,
/// tensors in `dtype`, alphas in `lora_adapter_metadata`), atomically. `index` gives the real
/// module paths of the kohya names (built from the models, see [`ModuleIndex`]).
pub fn save_peft(lora: &KohyaLora, index: &ModuleIndex, path: impl AsRef<Path>, dtype: DType) -> Result<(), LoraError> {
    let mut tensors = vec![];
    // Per component: alpha and rank of each module path.
    type Patterns = (BTreeMap<String, f32>, BTreeMap<String, usize>);
    let mut configs: BTreeMap<&str, Patterns> = BTreeMap::new();
    for (name, m) in lora.modules() {
        let (prefix, module_path) = index.resolve(name)?;
        let component = match prefix {
            KohyaPrefix::Unet => "unet",
            KohyaPrefix::TextEncoder | KohyaPrefix::TextEncoder1 => "text_encoder",
            KohyaPrefix::TextEncoder2 => "text_encoder_2",
        };
        // As diffusers writes it with transformers 5 (CLIP without the `text_model.` level); the
        // remaining path is a `.`-suffix of the transformers 4 name too, which peft accepts.
        let module_path =
            module_path.strip_prefix("text_model.").filter(|_| prefix != KohyaPrefix::Unet).unwrap_or(module_path);
        tensors.push((format!("{component}.{module_path}.lora_A.weight"), m.down.to_dtype(dtype)?));
        tensors.push((format!("{component}.{module_path}.lora_B.weight"), m.up.to_dtype(dtype)?));
        let alpha = match m.alpha {
            Some(a) if a != 0.0 => a,
            _ => m.rank() as f32,
        };
        let entry = configs.entry(component).or_default();
        entry.0.insert(module_path.to_string(), alpha);
        entry.1.insert(module_path.to_string(), m.rank());
    }
    let mut flat = serde_json::Map::new();
    for (component, (alphas, ranks)) in configs {
        // Every module listed in the patterns: exact, and independent of peft's defaults.
        let (&first_alpha, &first_rank) = (alphas.values().next().unwrap_or(&1.0), ranks.values().next().unwrap_or(&1));
        flat.insert(format!("{component}.lora_alpha"), first_alpha.into());
        flat.insert(format!("{component}.r"), first_rank.into());
        flat.insert(format!("{component}.alpha_pattern"), serde_json::to_value(&alphas).unwrap_or_default());
        flat.insert(format!("{component}.rank_pattern"), serde_json::to_value(&ranks).unwrap_or_default());
        let targets: Vec<&String> = alphas.keys().collect();
        flat.insert(format!("{component}.target_modules"), serde_json::to_value(targets).unwrap_or_default());
        flat.insert(format!("{component}.peft_type"), "LORA".into());
    }
    let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    metadata.insert(ADAPTER_METADATA_KEY.into(), serde_json::Value::Object(flat).to_string());
    write_safetensors(path.as_ref(), tensors, &metadata)
}
