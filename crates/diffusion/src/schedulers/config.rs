//! Building schedulers from diffusers' `scheduler_config.json` and from A1111 sampler names.

use std::path::Path;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::Scheduler;
use super::ddim::{DdimConfig, DdimScheduler};
use super::ddpm::{DdpmConfig, DdpmScheduler};
use super::dpm_solver_multistep::{AlgorithmType, DpmSolverMultistepConfig, DpmSolverMultistepScheduler};
use super::euler_ancestral_discrete::{EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler};
use super::euler_discrete::{EulerDiscreteConfig, EulerDiscreteScheduler};
use super::lcm::{LcmConfig, LcmScheduler};
use super::unipc_multistep::{UniPcMultistepConfig, UniPcMultistepScheduler};
use crate::error::{DiffusionError, Result};

/// The config of any supported scheduler, named by diffusers' `_class_name`.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerConfig {
    Ddim(DdimConfig),
    Ddpm(DdpmConfig),
    EulerDiscrete(EulerDiscreteConfig),
    EulerAncestralDiscrete(EulerAncestralDiscreteConfig),
    DpmSolverMultistep(DpmSolverMultistepConfig),
    UniPcMultistep(UniPcMultistepConfig),
    Lcm(LcmConfig),
}

/// The `_class_name`s [`SchedulerConfig`] reads.
const CLASSES: [&str; 7] = [
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
];

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| DiffusionError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a diffusers `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, Path::new("scheduler_config.json"))
    }

    /// Builds the config from a parsed `scheduler_config.json` object, by its `_class_name`.
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::from_object(value, Path::new("scheduler_config.json"))
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        // Python's json writes an unset `lambda_min_clipped` as -Infinity, which is not JSON; as
        // null it takes its default (-inf).
        let text = text.replace("-Infinity", "null");
        let value: Value =
            serde_json::from_str(&text).map_err(|e| DiffusionError::config(path, "(json)", e.to_string()))?;
        Self::from_object(&value, path)
    }

    fn from_object(value: &Value, path: &Path) -> Result<Self> {
        let object = value.as_object().ok_or_else(|| DiffusionError::config(path, "(json)", "not a JSON object"))?;
        let class = object
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| DiffusionError::config(path, "_class_name", "missing"))?;
        let fields = config_fields(object);
        Ok(match class {
            "DDIMScheduler" => Self::Ddim(deserialize(&fields, path)?),
            "DDPMScheduler" => Self::Ddpm(deserialize(&fields, path)?),
            "EulerDiscreteScheduler" => Self::EulerDiscrete(deserialize(&fields, path)?),
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestralDiscrete(deserialize(&fields, path)?),
            "DPMSolverMultistepScheduler" => Self::DpmSolverMultistep(deserialize(&fields, path)?),
            "UniPCMultistepScheduler" => Self::UniPcMultistep(deserialize(&fields, path)?),
            "LCMScheduler" => Self::Lcm(deserialize(&fields, path)?),
            other => {
                return Err(DiffusionError::config(
                    path,
                    "_class_name",
                    format!("unsupported scheduler `{other}` (supported: {})", CLASSES.join(", ")),
                ));
            }
        })
    }

    /// diffusers' `_class_name` of this config.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Ddim(_) => CLASSES[0],
            Self::Ddpm(_) => CLASSES[1],
            Self::EulerDiscrete(_) => CLASSES[2],
            Self::EulerAncestralDiscrete(_) => CLASSES[3],
            Self::DpmSolverMultistep(_) => CLASSES[4],
            Self::UniPcMultistep(_) => CLASSES[5],
            Self::Lcm(_) => CLASSES[6],
        }
    }

    /// Creates the scheduler (checking the config).
    pub fn build(&self) -> Result<Box<dyn Scheduler>> {
        Ok(match self {
            Self::Ddim(c) => Box::new(DdimScheduler::new(c.clone())?),
            Self::Ddpm(c) => Box::new(DdpmScheduler::new(c.clone())?),
            Self::EulerDiscrete(c) => Box::new(EulerDiscreteScheduler::new(c.clone())?),
            Self::EulerAncestralDiscrete(c) => Box::new(EulerAncestralDiscreteScheduler::new(c.clone())?),
            Self::DpmSolverMultistep(c) => Box::new(DpmSolverMultistepScheduler::new(c.clone())?),
            Self::UniPcMultistep(c) => Box::new(UniPcMultistepScheduler::new(c.clone())?),
            Self::Lcm(c) => Box::new(LcmScheduler::new(c.clone())?),
        })
    }
}

/// The fields of a config object the target class should read: without the private `_` keys,
/// without the keys diffusers marks as defaulted (`_use_default_values`), and without nulls
/// (diffusers' `None`, which is each field's default here).
fn config_fields(object: &Map<String, Value>) -> Map<String, Value> {
    let defaulted: Vec<&str> = object
        .get("_use_default_values")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    object
        .iter()
        .filter(|(k, v)| !k.starts_with('_') && !defaulted.contains(&k.as_str()) && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Deserializes a config, naming the offending field on error. Unknown fields are ignored, as
/// diffusers ignores the fields of other scheduler classes.
fn deserialize<T: DeserializeOwned>(fields: &Map<String, Value>, path: &Path) -> Result<T> {
    serde_json::from_value(Value::Object(fields.clone())).map_err(|e| {
        let field = fields
            .iter()
            .find(|(k, v)| {
                serde_json::from_value::<T>(Value::Object(Map::from_iter([((*k).clone(), (*v).clone())]))).is_err()
            })
            .map_or("(json)", |(k, _)| k.as_str());
        DiffusionError::config(path, field, e.to_string())
    })
}

/// The A1111 / EasyPhoto sampler names, each a diffusers scheduler with fixed settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    /// "DDIM": `DDIMScheduler`.
    Ddim,
    /// "Euler": `EulerDiscreteScheduler`.
    Euler,
    /// "Euler a": `EulerAncestralDiscreteScheduler`.
    EulerA,
    /// "DPM++ 2M": `DPMSolverMultistepScheduler`, `dpmsolver++`, order 2.
    DpmPp2M,
    /// "DPM++ 2M Karras": as "DPM++ 2M" with Karras sigmas.
    DpmPp2MKarras,
    /// "DPM++ 2M SDE": `DPMSolverMultistepScheduler`, `sde-dpmsolver++`, order 2.
    DpmPp2MSde,
    /// "DPM++ 2M SDE Karras" (EasyPhoto's default): as "DPM++ 2M SDE" with Karras sigmas.
    DpmPp2MSdeKarras,
    /// "UniPC": `UniPCMultistepScheduler` (bh2, order 2).
    UniPc,
    /// "LCM": `LCMScheduler`.
    Lcm,
}

impl Sampler {
    pub const ALL: [Sampler; 9] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerA,
        Self::DpmPp2M,
        Self::DpmPp2MKarras,
        Self::DpmPp2MSde,
        Self::DpmPp2MSdeKarras,
        Self::UniPc,
        Self::Lcm,
    ];

    /// The A1111 name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Euler => "Euler",
            Self::EulerA => "Euler a",
            Self::DpmPp2M => "DPM++ 2M",
            Self::DpmPp2MKarras => "DPM++ 2M Karras",
            Self::DpmPp2MSde => "DPM++ 2M SDE",
            Self::DpmPp2MSdeKarras => "DPM++ 2M SDE Karras",
            Self::UniPc => "UniPC",
            Self::Lcm => "LCM",
        }
    }

    /// This sampler's scheduler for a model whose scheduler config is `base` (its
    /// `scheduler/scheduler_config.json`, of any class), as diffusers'
    /// `Target.from_config(pipe.scheduler.config, **settings)`: the target class reads the fields
    /// it knows from `base`, keeps its own defaults for the rest, and the sampler's settings win.
    pub fn config(self, base: &Value) -> Result<SchedulerConfig> {
        let path = Path::new(self.name());
        let object = base.as_object().ok_or_else(|| DiffusionError::config(path, "(json)", "not a JSON object"))?;
        let fields = config_fields(object);
        let dpm = |algorithm_type, use_karras_sigmas| -> Result<SchedulerConfig> {
            let c: DpmSolverMultistepConfig = deserialize(&fields, path)?;
            Ok(SchedulerConfig::DpmSolverMultistep(DpmSolverMultistepConfig {
                algorithm_type,
                use_karras_sigmas,
                solver_order: 2,
                ..c
            }))
        };
        Ok(match self {
            Self::Ddim => SchedulerConfig::Ddim(deserialize(&fields, path)?),
            Self::Euler => SchedulerConfig::EulerDiscrete(EulerDiscreteConfig {
                use_karras_sigmas: false,
                ..deserialize(&fields, path)?
            }),
            Self::EulerA => SchedulerConfig::EulerAncestralDiscrete(deserialize(&fields, path)?),
            Self::DpmPp2M => dpm(AlgorithmType::DpmSolverPlusPlus, false)?,
            Self::DpmPp2MKarras => dpm(AlgorithmType::DpmSolverPlusPlus, true)?,
            Self::DpmPp2MSde => dpm(AlgorithmType::SdeDpmSolverPlusPlus, false)?,
            Self::DpmPp2MSdeKarras => dpm(AlgorithmType::SdeDpmSolverPlusPlus, true)?,
            Self::UniPc => SchedulerConfig::UniPcMultistep(deserialize(&fields, path)?),
            Self::Lcm => SchedulerConfig::Lcm(deserialize(&fields, path)?),
        })
    }
}

impl FromStr for Sampler {
    type Err = DiffusionError;

    /// Parses an A1111 sampler name (exactly as A1111 writes it, e.g. `DPM++ 2M SDE Karras`).
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|x| x.name()).collect();
            DiffusionError::input("sampler", format!("unknown sampler `{s}` (supported: {})", names.join(", ")))
        })
    }
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
