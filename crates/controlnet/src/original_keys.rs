//! Key names of the original lllyasviel ControlNet checkpoints (`control_model.*`).
//!
//! The original hint encoder is one `input_hint_block` Sequential alternating conv and SiLU,
//! so its convs sit at the even indices: `conv_in` at 0, diffusers `blocks.{j}` at `2 (j + 1)`
//! and `conv_out` right after the last block, at `2 (num_blocks + 1)` (14 for SD 1.5).

use easyphoto_diffusion::single_file::resnet_ldm;

use crate::{ControlNetConditioningEmbeddingConfig, ControlNetError, DIFFUSERS_PREFIX};

/// The prefix of the original checkpoints' keys (some re-exports leave it out).
pub const ORIGINAL_PREFIX: &str = "control_model.";
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

/// The original key (without `control_model.`) of a diffusers ControlNet key: the UNet-encoder
/// copy in LDM names (`time_embed`, `label_emb`, `input_blocks`, `middle_block`), the hint encoder
/// in `input_hint_block`, the zero convs in `zero_convs.{i}.0` and `middle_block_out.0`.
/// `layers_per_block` places the down blocks among the `input_blocks`.
pub fn diffusers_key_to_original(
    name: &str,
    layers_per_block: usize,
    hint: &ControlNetConditioningEmbeddingConfig,
) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let rest = |from: usize| parts.get(from..).map(|p| p.join(".")).unwrap_or_default();
    let index = |i: usize| parts.get(i).and_then(|s| s.parse::<usize>().ok());
    let mapped = match parts.as_slice() {
        [p, "conv_in", ..] if *p == DIFFUSERS_PREFIX => Some(format!("input_hint_block.0.{}", rest(2))),
        [p, "blocks", ..] if *p == DIFFUSERS_PREFIX => {
            index(2).map(|j| format!("input_hint_block.{}.{}", 2 * (j + 1), rest(3)))
        }
        [p, "conv_out", ..] if *p == DIFFUSERS_PREFIX => {
            Some(format!("input_hint_block.{}.{}", 2 * (hint.num_blocks() + 1), rest(2)))
        }
        ["controlnet_down_blocks", ..] => index(1).map(|i| format!("zero_convs.{i}.0.{}", rest(2))),
        ["controlnet_mid_block", ..] => Some(format!("middle_block_out.0.{}", rest(1))),
        ["conv_in", ..] => Some(format!("input_blocks.0.0.{}", rest(1))),
        ["time_embedding", "linear_1", ..] => Some(format!("time_embed.0.{}", rest(2))),
        ["time_embedding", "linear_2", ..] => Some(format!("time_embed.2.{}", rest(2))),
        ["add_embedding", "linear_1", ..] => Some(format!("label_emb.0.0.{}", rest(2))),
        ["add_embedding", "linear_2", ..] => Some(format!("label_emb.0.2.{}", rest(2))),
        ["down_blocks", _, kind, ..] => index(1).zip(index(3)).and_then(|(i, j)| {
            // Each level holds `layers_per_block` (resnet, attention) pairs and one downsampler.
            let first = 1 + i * (layers_per_block + 1);
            match *kind {
                "resnets" => Some(format!("input_blocks.{}.0.{}", first + j, resnet_ldm(&rest(4)))),
                "attentions" => Some(format!("input_blocks.{}.1.{}", first + j, rest(4))),
                "downsamplers" => Some(format!("input_blocks.{}.0.op.{}", first + layers_per_block, rest(5))),
                _ => None,
            }
        }),
        ["mid_block", "resnets", j, ..] => {
            j.parse::<usize>().ok().map(|j| format!("middle_block.{}.{}", 2 * j, resnet_ldm(&rest(3))))
        }
        ["mid_block", "attentions", "0", ..] => Some(format!("middle_block.1.{}", rest(3))),
        _ => None,
    };
    mapped.unwrap_or_else(|| name.to_string())
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
    fn sd15_encoder_and_zero_convs_map_to_ldm_names() {
        let hint = ControlNetConditioningEmbeddingConfig::default();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("down_blocks.0.resnets.1.conv1.weight", "input_blocks.2.0.in_layers.2.weight"),
            ("down_blocks.1.attentions.0.proj_in.weight", "input_blocks.4.1.proj_in.weight"),
            ("down_blocks.2.downsamplers.0.conv.bias", "input_blocks.9.0.op.bias"),
            ("down_blocks.3.resnets.1.time_emb_proj.weight", "input_blocks.11.0.emb_layers.1.weight"),
            ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
            ("mid_block.resnets.1.norm2.weight", "middle_block.2.out_layers.0.weight"),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("controlnet_down_blocks.11.weight", "zero_convs.11.0.weight"),
            ("controlnet_mid_block.bias", "middle_block_out.0.bias"),
            ("controlnet_cond_embedding.blocks.5.weight", "input_hint_block.12.weight"),
            ("controlnet_cond_embedding.conv_out.bias", "input_hint_block.14.bias"),
            ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        ];
        for (diffusers, original) in cases {
            assert_eq!(diffusers_key_to_original(diffusers, 2, &hint), original, "{diffusers}");
        }
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
