//! kohya-ss sd-scripts LoRA files: per module `<name>.lora_down.weight`,
//! `<name>.lora_up.weight` and an optional scalar `<name>.alpha`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::LoraError;
use crate::merge::pair_layout;

const DOWN: &str = "lora_down.weight";
const UP: &str = "lora_up.weight";
const ALPHA: &str = "alpha";

/// One adapted module: `down [r, in (, kh, kw)]`, `up [out, r (, 1, 1)]`, in the file's dtype.
#[derive(Debug, Clone)]
pub struct KohyaModule {
    /// `lora_down.weight`.
    pub down: Tensor,
    /// `lora_up.weight`.
    pub up: Tensor,
    /// `alpha`, if the file has one (see [`crate::lora_scale`] for what absent means).
    pub alpha: Option<f32>,
}

impl KohyaModule {
    /// The LoRA rank: the first dim of `down` (0 for a scalar `down`).
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }
}

/// A parsed kohya LoRA file: modules by kohya name (e.g. `lora_unet_..._attn1_to_q`).
#[derive(Debug, Clone)]
pub struct KohyaLora {
    modules: BTreeMap<String, KohyaModule>,
}

#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<Tensor>,
}

impl KohyaLora {
    /// Reads and parses the file at `path`, loading its tensors onto `device`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self, LoraError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| LoraError::Io { file: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes, &path.display().to_string(), device)
    }

    /// Parses the bytes of a LoRA file; `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str, device: &Device) -> Result<Self, LoraError> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|err| LoraError::NotSafetensors { file: file.to_string(), reason: err.to_string() })?;
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        for (key, view) in st.iter() {
            let unsupported = || LoraError::UnsupportedKey { file: file.to_string(), key: key.to_string() };
            let (module, suffix) = key.split_once('.').ok_or_else(unsupported)?;
            let entry = parts.entry(module.to_string()).or_default();
            let slot = match suffix {
                DOWN => &mut entry.down,
                UP => &mut entry.up,
                ALPHA => &mut entry.alpha,
                _ => return Err(unsupported()),
            };
            let tensor = view.load(device).map_err(|source| LoraError::LoadTensor {
                file: file.to_string(),
                key: key.to_string(),
                source: Box::new(source),
            })?;
            *slot = Some(tensor);
        }
        let modules = parts
            .into_iter()
            .map(|(name, parts)| {
                let module = assemble(&name, parts)?;
                Ok((name, module))
            })
            .collect::<Result<_, LoraError>>()?;
        Ok(Self { modules })
    }

    /// The module with kohya name `name`.
    pub fn get(&self, name: &str) -> Option<&KohyaModule> {
        self.modules.get(name)
    }

    /// All modules, sorted by kohya name.
    pub fn modules(&self) -> impl Iterator<Item = (&str, &KohyaModule)> {
        self.modules.iter().map(|(name, module)| (name.as_str(), module))
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether the file adapts no module.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

/// Checks that `parts` form a LoRA pair and reads the alpha.
fn assemble(name: &str, parts: Parts) -> Result<KohyaModule, LoraError> {
    let module = || name.to_string();
    let down = parts.down.ok_or_else(|| LoraError::MissingDown { module: module() })?;
    let up = parts.up.ok_or_else(|| LoraError::MissingUp { module: module() })?;
    if pair_layout(down.dims(), up.dims()).is_none() {
        let (down, up) = (down.dims().to_vec(), up.dims().to_vec());
        let same_rank = down.first().is_some_and(|&rank| up.get(1) == Some(&rank));
        return Err(if same_rank {
            LoraError::BadLayout { module: module(), down, up }
        } else {
            LoraError::RankMismatch { module: module(), down, up }
        });
    }
    let alpha = match parts.alpha {
        None => None,
        Some(alpha) => match alpha.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[..] {
            [value] => Some(value),
            _ => {
                return Err(LoraError::InvalidAlpha { module: module(), shape: alpha.dims().to_vec() });
            }
        },
    };
    Ok(KohyaModule { down, up, alpha })
}
