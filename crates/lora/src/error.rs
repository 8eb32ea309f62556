//! The error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong reading, resolving or merging a LoRA.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The LoRA file could not be read.
    #[error("cannot read LoRA file `{}`: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bytes are not a safetensors file (e.g. truncated).
    #[error("`{file}` is not a valid safetensors file: {reason}")]
    NotSafetensors {
        /// The file (or the name the caller gave the bytes).
        file: String,
        /// What the safetensors parser reported.
        reason: String,
    },
    /// A tensor of the file that candle cannot load (e.g. an unsupported dtype).
    #[error("cannot load tensor `{key}` of `{file}`: {source}")]
    LoadTensor {
        /// The file.
        file: String,
        /// The key.
        key: String,
        /// The underlying error, boxed to keep the enum small.
        source: Box<candle_core::Error>,
    },
    /// A module without `lora_down.weight`.
    #[error("LoRA module `{module}` has no lora_down.weight")]
    MissingDown {
        /// The kohya module name.
        module: String,
    },
    /// A module without `lora_up.weight`.
    #[error("LoRA module `{module}` has no lora_up.weight")]
    MissingUp {
        /// The kohya module name.
        module: String,
    },
    /// `lora_down` has another rank (first dim) than `lora_up` (second dim).
    #[error("LoRA module `{module}`: rank mismatch between lora_down {down:?} and lora_up {up:?}")]
    RankMismatch {
        /// The kohya module name.
        module: String,
        /// Shape of `lora_down.weight`.
        down: Vec<usize>,
        /// Shape of `lora_up.weight`.
        up: Vec<usize>,
    },
    /// `lora_down` and `lora_up` are not a Linear or Conv2d LoRA pair.
    #[error("LoRA module `{module}`: lora_down {down:?} and lora_up {up:?} are neither a linear nor a conv pair")]
    BadLayout {
        /// The kohya module name.
        module: String,
        /// Shape of `lora_down.weight`.
        down: Vec<usize>,
        /// Shape of `lora_up.weight`.
        up: Vec<usize>,
    },
    /// `alpha` holds more or fewer than one value.
    #[error("LoRA module `{module}`: alpha must hold one value, found shape {shape:?}")]
    InvalidAlpha {
        /// The kohya module name.
        module: String,
        /// Shape of the alpha tensor.
        shape: Vec<usize>,
    },
    /// A kohya name without one of the prefixes `lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`.
    #[error("LoRA module `{module}` has no kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)")]
    UnknownPrefix {
        /// The kohya module name.
        module: String,
    },
    /// A kohya name that matches none of the model's module paths.
    #[error("LoRA module `{module}` matches no module path of the model")]
    UnknownModule {
        /// The kohya module name.
        module: String,
    },
    /// Two module paths that flatten to the same kohya name.
    #[error("module paths `{first}` and `{second}` both have the kohya name `{name}`")]
    AmbiguousModule {
        /// The shared kohya name.
        name: String,
        /// The path registered first.
        first: String,
        /// The path registered second.
        second: String,
    },
    /// Tensors given to [`crate::delta_weight`] that are not a Linear or Conv2d LoRA pair.
    #[error("lora_down {down:?} and lora_up {up:?} are neither a linear nor a conv LoRA pair")]
    Layout {
        /// Shape of the down weight.
        down: Vec<usize>,
        /// Shape of the up weight.
        up: Vec<usize>,
    },
    /// A LoRA delta whose shape differs from the weight it is merged into.
    #[error("LoRA delta of shape {delta:?} does not fit the weight of shape {weight:?}")]
    WeightShape {
        /// Shape of the adapted weight.
        weight: Vec<usize>,
        /// Shape of the LoRA delta.
        delta: Vec<usize>,
    },
    /// A LoRA file could not be written (the temp file is removed, the target left untouched).
    #[error("cannot write LoRA file `{}`: {source}", file.display())]
    Write {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors metadata value that cannot be understood.
    #[error("metadata `{key}` of `{file}`: {reason}")]
    Metadata {
        /// The file.
        file: String,
        /// The metadata key (or config field).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A LoRA trained for another base model family than the model it is applied to.
    #[error("`{file}` is a LoRA for {lora} ({evidence}), the model is {model}")]
    WrongBase {
        /// The LoRA file.
        file: String,
        /// The family the LoRA was built for.
        lora: crate::BaseFamily,
        /// The family of the model.
        model: crate::BaseFamily,
        /// What the LoRA's family was read from.
        evidence: String,
    },
    /// A module whose delta does not fit the layer it resolves to.
    #[error("`{file}`: module `{module}` gives a delta of shape {delta:?} for a layer of shape {weight:?}")]
    ModuleShape {
        /// The LoRA file.
        file: String,
        /// The kohya module name.
        module: String,
        /// Shape of the layer's weight.
        weight: Vec<usize>,
        /// Shape of the LoRA delta.
        delta: Vec<usize>,
    },
    /// Modules or keys of a LoRA that adapt nothing in the model (strict application).
    #[error("`{file}`: {} module(s) match no layer of the model: {}", names.len(), names.join(", "))]
    Unmatched {
        /// The LoRA file.
        file: String,
        /// The kohya module names (or unsupported keys).
        names: Vec<String>,
    },
    /// LoRAs that cannot be averaged together.
    #[error("cannot fuse LoRAs: {reason}")]
    Fuse {
        /// Why.
        reason: String,
    },
    /// A training configuration value that cannot be used.
    #[error("training config `{field}`: {reason}")]
    Config {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// The training loss became NaN or infinite.
    #[error("training loss is {loss} at step {step}")]
    NonFiniteLoss {
        /// The optimizer step (1-based) whose loss was not finite.
        step: usize,
        /// The loss.
        loss: f32,
    },
    /// The progress callback asked to stop.
    #[error("training cancelled at step {step}")]
    Cancelled {
        /// The last completed optimizer step.
        step: usize,
    },
    /// A training state file (optimizer / RNG / step) that cannot be read back.
    #[error("training state `{}`: {reason}", file.display())]
    TrainState {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// An error of the diffusion models.
    #[error(transparent)]
    Diffusion(#[from] easyphoto_diffusion::DiffusionError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
