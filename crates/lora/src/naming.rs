//! kohya module names: `<prefix>_<module path with '.' replaced by '_'>`.
//!
//! The flattening is lossy (`down_blocks_0` could be `down.blocks.0` or `down_blocks.0`), so the
//! reverse lookup matches against the model's real module paths instead of guessing.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use crate::LoraError;

/// Which model a kohya LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KohyaPrefix {
    /// The UNet: `lora_unet`.
    Unet,
    /// The only text encoder of SD 1.x/2.x: `lora_te`.
    TextEncoder,
    /// SDXL's first text encoder: `lora_te1`.
    TextEncoder1,
    /// SDXL's second text encoder: `lora_te2`.
    TextEncoder2,
}

impl KohyaPrefix {
    /// Every prefix.
    pub const ALL: [Self; 4] = [Self::Unet, Self::TextEncoder, Self::TextEncoder1, Self::TextEncoder2];

    /// The prefix as written in kohya names, without the trailing `_`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unet => "lora_unet",
            Self::TextEncoder => "lora_te",
            Self::TextEncoder1 => "lora_te1",
            Self::TextEncoder2 => "lora_te2",
        }
    }

    /// Splits a kohya name into its prefix and the flattened module path after `<prefix>_`.
    pub fn split(name: &str) -> Option<(Self, &str)> {
        Self::ALL.into_iter().find_map(|prefix| {
            let rest = name.strip_prefix(prefix.as_str())?.strip_prefix('_')?;
            Some((prefix, rest))
        })
    }
}

/// The kohya name of `module_path` (e.g. `text_model.encoder.layers.0.self_attn.q_proj`).
pub fn kohya_name(prefix: KohyaPrefix, module_path: &str) -> String {
    format!("{}_{}", prefix.as_str(), module_path.replace('.', "_"))
}

/// Reverse lookup from kohya names to the real module paths of a model.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    by_name: HashMap<String, (KohyaPrefix, String)>,
}

impl ModuleIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the module paths of the model adapted under `prefix`; fails if two distinct
    /// paths flatten to the same kohya name.
    pub fn add<I, S>(&mut self, prefix: KohyaPrefix, module_paths: I) -> Result<(), LoraError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for path in module_paths {
            let path = path.into();
            self.add_alias(prefix, &path.clone(), path)?;
        }
        Ok(())
    }

    /// Registers the kohya name of `alias` as another name of the module at `path` (e.g. a text
    /// encoder path without transformers' `text_model.` level, which transformers 5 omits).
    pub fn add_alias(&mut self, prefix: KohyaPrefix, alias: &str, path: String) -> Result<(), LoraError> {
        match self.by_name.entry(kohya_name(prefix, alias)) {
            Entry::Vacant(entry) => {
                entry.insert((prefix, path));
            }
            Entry::Occupied(entry) if entry.get() == &(prefix, path.clone()) => {}
            Entry::Occupied(entry) => {
                return Err(LoraError::AmbiguousModule {
                    name: entry.key().clone(),
                    first: entry.get().1.clone(),
                    second: path,
                });
            }
        }
        Ok(())
    }

    /// The prefix and real module path of the kohya module `name`.
    pub fn resolve(&self, name: &str) -> Result<(KohyaPrefix, &str), LoraError> {
        if KohyaPrefix::split(name).is_none() {
            return Err(LoraError::UnknownPrefix { module: name.to_string() });
        }
        self.by_name
            .get(name)
            .map(|(prefix, path)| (*prefix, path.as_str()))
            .ok_or_else(|| LoraError::UnknownModule { module: name.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_flatten_dots() {
        assert_eq!(
            kohya_name(KohyaPrefix::Unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(
            kohya_name(KohyaPrefix::TextEncoder2, "text_model.encoder.layers.0.self_attn.q_proj"),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
        );
    }

    #[test]
    fn split_tells_te_from_te1_and_te2() {
        assert_eq!(KohyaPrefix::split("lora_te_text_model_x"), Some((KohyaPrefix::TextEncoder, "text_model_x")));
        assert_eq!(KohyaPrefix::split("lora_te1_text_model_x"), Some((KohyaPrefix::TextEncoder1, "text_model_x")));
        assert_eq!(KohyaPrefix::split("lora_te2_text_model_x"), Some((KohyaPrefix::TextEncoder2, "text_model_x")));
        assert_eq!(KohyaPrefix::split("lora_unet_mid_block"), Some((KohyaPrefix::Unet, "mid_block")));
        assert_eq!(KohyaPrefix::split("lora_unetmid_block"), None);
        assert_eq!(KohyaPrefix::split("unet_mid_block"), None);
    }

    #[test]
    fn resolve_round_trips_every_prefix() -> Result<(), LoraError> {
        let mut index = ModuleIndex::new();
        index.add(KohyaPrefix::Unet, ["mid_block.attentions.0.proj_out"])?;
        for prefix in [KohyaPrefix::TextEncoder1, KohyaPrefix::TextEncoder2] {
            index.add(prefix, ["text_model.encoder.layers.0.mlp.fc1"])?;
        }
        assert_eq!(
            index.resolve("lora_unet_mid_block_attentions_0_proj_out")?,
            (KohyaPrefix::Unet, "mid_block.attentions.0.proj_out")
        );
        assert_eq!(
            index.resolve("lora_te2_text_model_encoder_layers_0_mlp_fc1")?,
            (KohyaPrefix::TextEncoder2, "text_model.encoder.layers.0.mlp.fc1")
        );
        Ok(())
    }

    #[test]
    fn unresolvable_names_are_typed_errors() -> Result<(), LoraError> {
        let mut index = ModuleIndex::new();
        index.add(KohyaPrefix::Unet, ["conv_in"])?;
        assert!(matches!(
            index.resolve("lora_unet_conv_out"),
            Err(LoraError::UnknownModule { module }) if module == "lora_unet_conv_out"
        ));
        assert!(matches!(
            index.resolve("lycoris_conv_in"),
            Err(LoraError::UnknownPrefix { module }) if module == "lycoris_conv_in"
        ));
        Ok(())
    }

    #[test]
    fn colliding_paths_are_ambiguous() {
        let mut index = ModuleIndex::new();
        let err = index.add(KohyaPrefix::Unet, ["a_b.c", "a_b.c", "a.b_c"]).expect_err("a_b.c and a.b_c collide");
        assert!(matches!(
            err,
            LoraError::AmbiguousModule { name, first, second }
                if name == "lora_unet_a_b_c" && first == "a_b.c" && second == "a.b_c"
        ));
    }
}
