//! Key names of the original lllyasviel ControlNet checkpoints (`control_model.*`).
//!
//! The original hint encoder is one `input_hint_block` Sequential alternating conv and SiLU,
//! so its convs sit at the even indices: `conv_in` at 0, diffusers `blocks.{j}` at `2 (j + 1)`
//! and `conv_out` right after the last block, at `2 (num_blocks + 1)` (14 for SD 1.5).

use crate::{ControlNetConditioningEmbeddingConfig, ControlNetError, DIFFUSERS_PREFIX};

const ORIGINAL_PREFIX: &str = "control_model.";
const HINT_BLOCK: &str = "input_hint_block.";

/// Maps an original hint-encoder key (`[control_model.]input_hint_block.{i}.{param}`) to its
/// diffusers key (`controlnet_cond_embedding.{conv_in | blocks.n | conv_out}.{param}`).
///
/// Returns `Ok(None)` for keys outside `input_hint_block`, and an error for an index that holds
/// no conv in a hint encoder shaped by `config`.
pub fn original_hint_key_to_diffusers(
    key: &str,
    config: &ControlNetConditioningEmbeddingConfig,
) -> Result<Option<String>, ControlNetError> {
    let local = key.strip_prefix(ORIGINAL_PREFIX).unwrap_or(key);
    let Some(rest) = local.strip_prefix(HINT_BLOCK) else {
        return Ok(None);
    };
    let unexpected = |reason: String| ControlNetError::UnexpectedOriginalKey { key: key.to_string(), reason };
    let (index, param) =
        rest.split_once('.').ok_or_else(|| unexpected("expected `input_hint_block.{index}.{param}`".to_string()))?;
    let index: usize = index.parse().map_err(|_| unexpected(format!("`{index}` is not a layer index")))?;
    if index % 2 == 1 {
        return Err(unexpected(format!("index {index} is a SiLU, which has no parameters")));
    }
    let num_blocks = config.num_blocks();
    let module = match index / 2 {
        0 => "conv_in".to_string(),
        conv if conv <= num_blocks => format!("blocks.{}", conv - 1),
        conv if conv == num_blocks + 1 => "conv_out".to_string(),
        _ => {
            return Err(unexpected(format!(
                "index {index} is past conv_out (index {}) for block_out_channels {:?}",
                2 * (num_blocks + 1),
                config.block_out_channels
            )));
        }
    };
    Ok(Some(format!("{DIFFUSERS_PREFIX}.{module}.{param}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(key: &str, config: &ControlNetConditioningEmbeddingConfig) -> Option<String> {
        original_hint_key_to_diffusers(key, config).expect("key maps")
    }

    #[test]
    fn sd15_layout_maps_even_indices_to_convs() {
        let config = ControlNetConditioningEmbeddingConfig::default();
        let cases = [
            ("control_model.input_hint_block.0.weight", "conv_in.weight"),
            ("control_model.input_hint_block.2.bias", "blocks.0.bias"),
            ("control_model.input_hint_block.4.weight", "blocks.1.weight"),
            ("control_model.input_hint_block.12.weight", "blocks.5.weight"),
            ("control_model.input_hint_block.14.bias", "conv_out.bias"),
            ("input_hint_block.14.weight", "conv_out.weight"),
        ];
        for (original, diffusers) in cases {
            assert_eq!(map(original, &config), Some(format!("{DIFFUSERS_PREFIX}.{diffusers}")), "{original}");
        }
    }

    #[test]
    fn conv_out_index_follows_block_count() {
        let config = ControlNetConditioningEmbeddingConfig { block_out_channels: vec![4, 8], ..Default::default() };
        let key = "control_model.input_hint_block.6.weight";
        assert_eq!(map(key, &config).as_deref(), Some("controlnet_cond_embedding.conv_out.weight"));
        let single = ControlNetConditioningEmbeddingConfig { block_out_channels: vec![4], ..Default::default() };
        let key = "control_model.input_hint_block.2.weight";
        assert_eq!(map(key, &single).as_deref(), Some("controlnet_cond_embedding.conv_out.weight"));
    }

    #[test]
    fn other_keys_are_not_hint_keys() {
        let config = ControlNetConditioningEmbeddingConfig::default();
        assert_eq!(map("control_model.input_blocks.0.0.weight", &config), None);
        assert_eq!(map("control_model.zero_convs.0.0.bias", &config), None);
    }

    #[test]
    fn silu_and_out_of_range_indices_are_errors() {
        let config = ControlNetConditioningEmbeddingConfig::default();
        for key in [
            "control_model.input_hint_block.3.weight",
            "control_model.input_hint_block.16.weight",
            "control_model.input_hint_block.x.weight",
            "control_model.input_hint_block.0",
        ] {
            match original_hint_key_to_diffusers(key, &config) {
                Err(ControlNetError::UnexpectedOriginalKey { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
    }
}
