"""Seed fixtures for the `easyphoto-controlnet` and `easyphoto-lora` crates.

Writes, with fixed seeds and random weights (no model hub is needed):

crates/controlnet/tests/fixtures/
  cond_embedding_diffusers.safetensors  diffusers ControlNetConditioningEmbedding weights,
                                        keys `controlnet_cond_embedding.{conv_in,blocks.N,conv_out}.*`
  cond_embedding_original.safetensors   the same weights under the original lllyasviel keys
                                        `control_model.input_hint_block.{0,2,...,14}.*`
  cond_embedding_io.safetensors         `input` [2,3,40,24] in [0,1) and diffusers' `output`

crates/lora/tests/fixtures/
  kohya_lora.safetensors                kohya-format LoRA (`<name>.lora_down.weight`,
                                        `<name>.lora_up.weight`, optional `<name>.alpha`)
  lora_expected.safetensors             `base.<module path>` original weights,
                                        `merged.<module path>` weights after kohya's merge_to,
                                        `multiplier` (scalar f32)

The kohya merge (sd-scripts networks/lora.py, LoRAInfModule.merge_to) is re-implemented below
and asserted equal to peft's merge_and_unload() at multiplier 1.0.

Usage: .venv-ref/bin/python tools/reference/controlnet_lora_seed.py
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
CONTROLNET_DIR = ROOT / "crates" / "controlnet" / "tests" / "fixtures"
LORA_DIR = ROOT / "crates" / "lora" / "tests" / "fixtures"


def randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every weight randn/sqrt(fan_in), every bias 0.1*randn: nothing is left zero."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def contiguous(d: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in d.items()}


# ---------------------------------------------------------------- controlnet


def controlnet_fixtures() -> None:
    gen = torch.Generator().manual_seed(20240601)
    block_out_channels = (4, 8, 8, 16)
    emb = ControlNetConditioningEmbedding(
        conditioning_embedding_channels=32,
        conditioning_channels=3,
        block_out_channels=block_out_channels,
    ).eval()
    # diffusers zero-initialises conv_out (zero_module): re-randomise it with the rest.
    randomise(emb, gen)
    assert all(p.abs().min() > 0 for p in emb.parameters()), "a parameter is still zero"

    x = torch.rand((2, 3, 40, 24), generator=gen)
    with torch.no_grad():
        y = emb(x)
    assert y.shape == (2, 32, 5, 3), y.shape

    state = emb.state_dict()
    diffusers_sd = {f"controlnet_cond_embedding.{k}": v for k, v in state.items()}

    # Original layout: input_hint_block is Sequential(conv, SiLU, conv, SiLU, ..., conv), so the
    # convs sit at the even indices: conv_in at 0, blocks.j at 2(j+1), conv_out right after.
    num_blocks = 2 * (len(block_out_channels) - 1)

    def original_name(k: str) -> str:
        module, param = k.rsplit(".", 1)
        if module == "conv_in":
            idx = 0
        elif module == "conv_out":
            idx = 2 * (num_blocks + 1)
        else:
            idx = 2 * (int(module.split(".")[1]) + 1)
        return f"control_model.input_hint_block.{idx}.{param}"

    original_sd = {original_name(k): v for k, v in state.items()}
    assert "control_model.input_hint_block.14.weight" in original_sd

    CONTROLNET_DIR.mkdir(parents=True, exist_ok=True)
    save_file(contiguous(diffusers_sd), CONTROLNET_DIR / "cond_embedding_diffusers.safetensors")
    save_file(contiguous(original_sd), CONTROLNET_DIR / "cond_embedding_original.safetensors")
    save_file(contiguous({"input": x, "output": y}), CONTROLNET_DIR / "cond_embedding_io.safetensors")


# ---------------------------------------------------------------------- lora


def kohya_delta(down: torch.Tensor, up: torch.Tensor, alpha, multiplier: float) -> torch.Tensor:
    """The delta of sd-scripts networks/lora.py LoRAInfModule.merge_to, in float32."""
    rank = down.shape[0]
    alpha = rank if alpha is None or alpha == 0 else alpha  # LoRAModule.__init__
    scale = alpha / rank
    up, down = up.float(), down.float()
    if down.dim() == 2:  # linear
        return multiplier * (up @ down) * scale
    if down.shape[2:4] == (1, 1):  # conv2d 1x1
        return multiplier * (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    # conv2d 3x3
    conved = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return multiplier * conved * scale


class Holder(torch.nn.Module):
    """A one-layer model, so that peft can target it by the name `layer`."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer


def peft_merged(layer: torch.nn.Module, down, up, alpha, rank: int) -> torch.Tensor:
    # peft's default lora_alpha is 8, not r: kohya's "alpha absent" must be spelled as r here.
    lora_alpha = rank if alpha is None or alpha == 0 else alpha
    model = get_peft_model(Holder(layer), LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["layer"]))
    lora_layer = model.base_model.model.layer
    with torch.no_grad():
        lora_layer.lora_A["default"].weight.copy_(down)
        lora_layer.lora_B["default"].weight.copy_(up)
    merged = model.merge_and_unload()
    return merged.layer.weight.detach().clone()


# (kohya prefix, module path, layer factory, rank, alpha) -- alpha None: no `.alpha` key.
LORA_MODULES = [
    ("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     lambda: torch.nn.Linear(40, 24, bias=False), 4, 2.0),
    ("lora_unet", "down_blocks.0.attentions.0.proj_in", lambda: torch.nn.Conv2d(8, 12, 1), 4, None),
    ("lora_unet", "down_blocks.0.resnets.0.conv1", lambda: torch.nn.Conv2d(8, 12, 3, padding=1), 4, 8.0),
    ("lora_te", "text_model.encoder.layers.0.self_attn.q_proj", lambda: torch.nn.Linear(24, 16), 4, 0.0),
]
MULTIPLIER = 0.7


def lora_fixtures() -> None:
    gen = torch.Generator().manual_seed(20240602)
    lora_sd, expected = {}, {"multiplier": torch.tensor(MULTIPLIER, dtype=torch.float32)}
    for prefix, path, make, rank, alpha in LORA_MODULES:
        torch.manual_seed(0)  # layer construction draws from the global generator
        layer = make()
        randomise(layer, gen)
        weight = layer.weight.detach().clone()
        if weight.dim() == 2:
            down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
        else:
            down_shape, up_shape = (rank, *weight.shape[1:]), (weight.shape[0], rank, 1, 1)
        down = torch.randn(down_shape, generator=gen) / (torch.Size(down_shape[1:]).numel() ** 0.5)
        up = 0.5 * torch.randn(up_shape, generator=gen)

        merged = weight + kohya_delta(down, up, alpha, MULTIPLIER)
        reference = peft_merged(layer, down, up, alpha, rank)
        kohya_full = weight + kohya_delta(down, up, alpha, 1.0)
        err = (reference - kohya_full).abs().max().item()
        assert err <= 1e-6, f"peft and kohya disagree on {path}: {err}"
        print(f"{path}: peft vs kohya (multiplier 1.0) max abs {err:.3g}")

        name = f"{prefix}_{path.replace('.', '_')}"
        lora_sd[f"{name}.lora_down.weight"] = down
        lora_sd[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            lora_sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        expected[f"base.{path}"] = weight
        expected[f"merged.{path}"] = merged

    LORA_DIR.mkdir(parents=True, exist_ok=True)
    save_file(contiguous(lora_sd), LORA_DIR / "kohya_lora.safetensors")
    save_file(contiguous(expected), LORA_DIR / "lora_expected.safetensors")


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    controlnet_fixtures()
    lora_fixtures()
