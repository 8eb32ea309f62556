//! kohya-ss sd-scripts / A1111 LoRA files: per module `<name>.lora_down.weight`,
//! `<name>.lora_up.weight` and an optional scalar `<name>.alpha`, plus string metadata
//! (`ss_base_model_version`, `ss_network_dim`, ...). [`KohyaLora`] is also the crate's in-memory
//! form of a LoRA: diffusers/peft files are converted to kohya names when read
//! ([`crate::peft_file`]).

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

/// A LoRA: modules by kohya name (e.g. `lora_unet_..._attn1_to_q`), the file's metadata, and the
/// keys that were not LoRA down/up/alpha tensors (DoRA scales, LyCORIS factors, ...), which are
/// reported rather than dropped silently.
#[derive(Debug, Clone)]
pub struct KohyaLora {
    file: String,
    modules: BTreeMap<String, KohyaModule>,
    metadata: BTreeMap<String, String>,
    unsupported: Vec<String>,
}

#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<Tensor>,
}

impl KohyaLora {
    /// A LoRA from modules already in memory; `file` names it in errors.
    pub fn new(
        file: impl Into<String>,
        modules: BTreeMap<String, KohyaModule>,
        metadata: BTreeMap<String, String>,
    ) -> Self {
        Self { file: file.into(), modules, metadata, unsupported: vec![] }
    }

    /// Reads and parses the kohya file at `path`, loading its tensors onto `device`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self, LoraError> {
        let path = path.as_ref();
        let bytes = read(path)?;
        Self::from_bytes(&bytes, &path.display().to_string(), device)
    }

    /// Parses the bytes of a kohya LoRA file; `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str, device: &Device) -> Result<Self, LoraError> {
        let (st, metadata) = deserialize(bytes, file)?;
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unsupported = vec![];
        for (key, view) in st.iter() {
            let Some((module, suffix)) = key.split_once('.') else {
                unsupported.push(key.to_string());
                continue;
            };
            let entry = parts.entry(module.to_string()).or_default();
            let slot = match suffix {
                DOWN => &mut entry.down,
                UP => &mut entry.up,
                ALPHA => &mut entry.alpha,
                _ => {
                    unsupported.push(key.to_string());
                    continue;
                }
            };
            *slot = Some(load_tensor(&view, file, key, device)?);
        }
        // Modules that had only unsupported keys (e.g. a LoHa's `hada_w1_a`) are not LoRA modules.
        parts.retain(|_, p| p.down.is_some() || p.up.is_some() || p.alpha.is_some());
        let modules = parts
            .into_iter()
            .map(|(name, parts)| {
                let module = assemble(&name, parts)?;
                Ok((name, module))
            })
            .collect::<Result<_, LoraError>>()?;
        unsupported.sort();
        Ok(Self { file: file.to_string(), modules, metadata, unsupported })
    }

    /// Writes the LoRA in kohya layout with tensors (alphas included) in `dtype`, atomically:
    /// to a temp file beside `path`, then renamed over it. A module without alpha gets none.
    pub fn save(&self, path: impl AsRef<Path>, dtype: DType) -> Result<(), LoraError> {
        let mut tensors = Vec::with_capacity(3 * self.modules.len());
        for (name, m) in &self.modules {
            tensors.push((format!("{name}.{DOWN}"), m.down.to_dtype(dtype)?));
            tensors.push((format!("{name}.{UP}"), m.up.to_dtype(dtype)?));
            if let Some(alpha) = m.alpha {
                let alpha = Tensor::new(alpha, m.down.device())?.to_dtype(dtype)?;
                tensors.push((format!("{name}.{ALPHA}"), alpha));
            }
        }
        write_safetensors(path.as_ref(), tensors, &self.metadata)
    }

    /// The name errors give the LoRA (its path when loaded from a file).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The module with kohya name `name`.
    pub fn get(&self, name: &str) -> Option<&KohyaModule> {
        self.modules.get(name)
    }

    /// All modules, sorted by kohya name.
    pub fn modules(&self) -> impl Iterator<Item = (&str, &KohyaModule)> {
        self.modules.iter().map(|(name, module)| (name.as_str(), module))
    }

    /// The safetensors metadata (`ss_base_model_version`, `ss_network_dim`, ...).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Sets one metadata entry (written by [`Self::save`]).
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.insert(key.into(), value.into());
    }

    /// Keys of the file that are not LoRA down/up/alpha tensors (sorted).
    pub fn unsupported_keys(&self) -> &[String] {
        &self.unsupported
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether the file adapts no module.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    pub(crate) fn with_unsupported(mut self, keys: Vec<String>) -> Self {
        self.unsupported = keys;
        self.unsupported.sort();
        self
    }
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, LoraError> {
    std::fs::read(path).map_err(|source| LoraError::Io { file: path.to_path_buf(), source })
}

/// The parsed file and its metadata.
pub(crate) fn deserialize<'a>(
    bytes: &'a [u8],
    file: &str,
) -> Result<(SafeTensors<'a>, BTreeMap<String, String>), LoraError> {
    let bad = |err: safetensors::SafeTensorError| LoraError::NotSafetensors {
        file: file.to_string(),
        reason: err.to_string(),
    };
    let st = SafeTensors::deserialize(bytes).map_err(bad)?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let metadata = header.metadata().clone().unwrap_or_default().into_iter().collect();
    Ok((st, metadata))
}

pub(crate) fn load_tensor(
    view: &safetensors::tensor::TensorView<'_>,
    file: &str,
    key: &str,
    device: &Device,
) -> Result<Tensor, LoraError> {
    view.load(device).map_err(|source| LoraError::LoadTensor {
        file: file.to_string(),
        key: key.to_string(),
        source: Box::new(source),
    })
}

/// Serialises `tensors` with `metadata` to a temp file beside `path`, syncs it and renames it
/// over `path`; on failure the temp file is removed and `path` is untouched.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), LoraError> {
    let hashed = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    let mut bytes = safetensors::serialize(tensors, hashed)
        .map_err(|err| LoraError::Write { file: path.to_path_buf(), source: std::io::Error::other(err.to_string()) })?;
    sort_header_metadata(&mut bytes, metadata);
    write_atomically(path, &bytes)
}

/// The safetensors crate writes `__metadata__` from a `HashMap`, in an order that changes from
/// process to process. Rewrites it in key order, so that equal LoRAs give equal bytes: the same
/// entries serialise to the same length, so the header keeps its size and the data its offsets.
fn sort_header_metadata(bytes: &mut [u8], metadata: &BTreeMap<String, String>) {
    const KEY: &[u8] = br#"{"__metadata__":"#;
    if metadata.is_empty() || bytes.len() < 8 + KEY.len() || &bytes[8..8 + KEY.len()] != KEY {
        return;
    }
    let Ok(sorted) = serde_json::to_vec(metadata) else { return };
    let start = 8 + KEY.len();
    let end = start + sorted.len();
    if bytes.len() > end && bytes[start] == b'{' && bytes[end - 1] == b'}' && matches!(bytes[end], b',' | b'}') {
        bytes[start..end].copy_from_slice(&sorted);
    }
}

/// Writes `bytes` to `<path>.tmp-<pid>`, syncs, and renames it to `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LoraError> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        LoraError::Write { file: path.to_path_buf(), source }
    })
}

/// Checks that `parts` form a LoRA pair and reads the alpha.
fn assemble(name: &str, parts: Parts) -> Result<KohyaModule, LoraError> {
    let module = || name.to_string();
    let down = parts.down.ok_or_else(|| LoraError::MissingDown { module: module() })?;
    let up = parts.up.ok_or_else(|| LoraError::MissingUp { module: module() })?;
    check_pair(name, &down, &up)?;
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

/// Checks that `down` and `up` are a Linear or Conv2d LoRA pair.
pub(crate) fn check_pair(name: &str, down: &Tensor, up: &Tensor) -> Result<(), LoraError> {
    if pair_layout(down.dims(), up.dims()).is_none() {
        let (down, up) = (down.dims().to_vec(), up.dims().to_vec());
        let same_rank = down.first().is_some_and(|&rank| up.get(1) == Some(&rank));
        return Err(if same_rank {
            LoraError::BadLayout { module: name.to_string(), down, up }
        } else {
            LoraError::RankMismatch { module: name.to_string(), down, up }
        });
    }
    Ok(())
}
