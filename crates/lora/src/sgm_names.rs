//! SGM (original Stable Diffusion / SDXL) module paths of a diffusers UNet, for kohya files
//! trained on the original UNet (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
//! `lora_unet_middle_block_1_proj_in`, `lora_unet_output_blocks_2_2_conv`, resnets
//! `in_layers_2` / `emb_layers_1` / `out_layers_3` / `skip_connection`). The block numbering is
//! read from the model's own layer paths (resnets per block, downsamplers, attentions), so it
//! holds for any `layers_per_block`.

use std::collections::BTreeMap;

/// `(sgm path, diffusers path)` for every diffusers path that has an SGM counterpart.
pub fn sgm_aliases<'p>(paths: &[&'p str]) -> Vec<(String, &'p str)> {
    let layout = Layout::new(paths);
    paths.iter().filter_map(|&p| Some((layout.sgm(p)?, p))).collect()
}

/// Per block index: number of resnets, whether it has a down/upsampler, whether it has attentions.
#[derive(Default)]
struct Layout {
    down: BTreeMap<usize, Block>,
    up: BTreeMap<usize, Block>,
}

#[derive(Default, Clone, Copy)]
struct Block {
    resnets: usize,
    sampler: bool,
    attentions: bool,
}

impl Layout {
    fn new(paths: &[&str]) -> Self {
        let mut layout = Self::default();
        for p in paths {
            let parts: Vec<&str> = p.split('.').collect();
            let (Some(&kind), Some(i), Some(&part)) =
                (parts.first(), parts.get(1).and_then(|i| i.parse().ok()), parts.get(2))
            else {
                continue;
            };
            let block: &mut Block = match kind {
                "down_blocks" => layout.down.entry(i).or_default(),
                "up_blocks" => layout.up.entry(i).or_default(),
                _ => continue,
            };
            match (part, parts.get(3).and_then(|j| j.parse::<usize>().ok())) {
                ("resnets", Some(j)) => block.resnets = block.resnets.max(j + 1),
                ("attentions", _) => block.attentions = true,
                ("downsamplers" | "upsamplers", _) => block.sampler = true,
                _ => {}
            }
        }
        layout
    }

    /// First `input_blocks` index of down block `i`, or first `output_blocks` index of up block `i`.
    fn start(blocks: &BTreeMap<usize, Block>, i: usize, first: usize, with_sampler: bool) -> usize {
        first + blocks.range(..i).map(|(_, b)| b.resnets + usize::from(with_sampler && b.sampler)).sum::<usize>()
    }

    fn sgm(&self, path: &str) -> Option<String> {
        let parts: Vec<&str> = path.split('.').collect();
        let rest = |from: usize| parts.get(from..).map(|p| p.join(".")).unwrap_or_default();
        let num = |i: usize| parts.get(i).and_then(|s| s.parse::<usize>().ok());
        match parts.as_slice() {
            ["conv_in"] => Some("input_blocks.0.0".into()),
            ["time_embedding", "linear_1"] => Some("time_embed.0".into()),
            ["time_embedding", "linear_2"] => Some("time_embed.2".into()),
            ["add_embedding", "linear_1"] => Some("label_emb.0.0".into()),
            ["add_embedding", "linear_2"] => Some("label_emb.0.2".into()),
            ["conv_out"] => Some("out.2".into()),
            ["mid_block", "resnets", j, ..] => {
                let j: usize = j.parse().ok()?;
                Some(format!("middle_block.{}.{}", 2 * j, resnet(&rest(3))?))
            }
            ["mid_block", "attentions", "0", ..] => Some(format!("middle_block.1.{}", rest(3))),
            ["down_blocks", _, kind, ..] => {
                let (i, j) = (num(1)?, num(3)?);
                let start = Self::start(&self.down, i, 1, true);
                match *kind {
                    "resnets" => Some(format!("input_blocks.{}.0.{}", start + j, resnet(&rest(4))?)),
                    "attentions" => Some(format!("input_blocks.{}.1.{}", start + j, rest(4))),
                    "downsamplers" if rest(4) == "conv" => {
                        Some(format!("input_blocks.{}.0.op", start + self.down.get(&i)?.resnets))
                    }
                    _ => None,
                }
            }
            ["up_blocks", _, kind, ..] => {
                let (i, j) = (num(1)?, num(3)?);
                let start = Self::start(&self.up, i, 0, false);
                let block = self.up.get(&i)?;
                match *kind {
                    "resnets" => Some(format!("output_blocks.{}.0.{}", start + j, resnet(&rest(4))?)),
                    "attentions" => Some(format!("output_blocks.{}.1.{}", start + j, rest(4))),
                    "upsamplers" if rest(4) == "conv" => {
                        let slot = if block.attentions { 2 } else { 1 };
                        Some(format!("output_blocks.{}.{slot}.conv", start + block.resnets - 1))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// SGM name of a resnet member.
fn resnet(member: &str) -> Option<&'static str> {
    Some(match member {
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_base_layout() {
        // SDXL: 3 levels, 2 resnets each, attentions in levels 1 and 2, 3 resnets per up block.
        let mut paths =
            vec!["conv_in".to_string(), "mid_block.attentions.0.proj_in".into(), "mid_block.resnets.1.conv2".into()];
        for i in 0..3 {
            for j in 0..2 {
                paths.push(format!("down_blocks.{i}.resnets.{j}.conv1"));
                if i > 0 {
                    paths.push(format!("down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.to_q"));
                }
            }
            if i < 2 {
                paths.push(format!("down_blocks.{i}.downsamplers.0.conv"));
            }
            for j in 0..3 {
                paths.push(format!("up_blocks.{i}.resnets.{j}.conv_shortcut"));
                if i < 2 {
                    paths.push(format!("up_blocks.{i}.attentions.{j}.proj_out"));
                }
            }
            if i < 2 {
                paths.push(format!("up_blocks.{i}.upsamplers.0.conv"));
            }
        }
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let map: BTreeMap<String, &str> = sgm_aliases(&refs).into_iter().collect();
        let want = [
            ("input_blocks.0.0", "conv_in"),
            ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
            ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
            (
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            (
                "input_blocks.8.1.transformer_blocks.0.attn1.to_q",
                "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q",
            ),
            ("middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
            ("middle_block.2.out_layers.3", "mid_block.resnets.1.conv2"),
            ("output_blocks.0.1.proj_out", "up_blocks.0.attentions.0.proj_out"),
            ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
            ("output_blocks.5.1.proj_out", "up_blocks.1.attentions.2.proj_out"),
            ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
        ];
        for (sgm, diffusers) in want {
            assert_eq!(map.get(sgm), Some(&diffusers), "{sgm}");
        }
    }
}
