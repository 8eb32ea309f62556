#!/usr/bin/env python3
"""Parity fixtures for the ControlNet model of crates/controlnet.

Builds tiny diffusers ``ControlNetModel``s with every parameter re-randomised (so the zero convs
are not zero) and rounded to float16, and records diffusers' float32 outputs:

- ``sd15_controlnet/``: ``ControlNetModel.from_unet`` of the tiny SD1.5-like UNet of
  crates/diffusion/tests/fixtures/sd15 (hint encoder (8, 16): one stride-2 conv, so the
  conditioning image is twice the latent size, like the tiny VAE's factor 2).
- ``sdxl_controlnet/``: an SDXL-like ControlNet (``text_time`` conditioning) shaped like the tiny
  SDXL UNet but with fewer transformer layers ([0, 0, 1] instead of [1, 1, 2]), as the reduced
  "mid" / "small" SDXL ControlNets are; hint encoder (8, 16, 16) (factor 4, like the tiny
  ``vae3``).
- ``sd15_controlnet.pth``: the SD1.5-like model in the original lllyasviel layout
  (``control_model.`` + LDM UNet-encoder names, ``input_hint_block.*``, ``zero_convs.*``,
  ``middle_block_out.*``), a real torch zip pickle holding a bare state dict (float16), checked
  against diffusers' own ``convert_controlnet_checkpoint``.
- ``full_size_layouts.json``: the key names and shapes (no weights) of a full-size SD 1.5 ControlNet
  in the original layout (``control_model.`` keys) and of an SDXL-width ControlNet with reduced
  depth in the diffusers layout, with their diffusers configs: the tests rebuild weightless
  (sparse) files from them to check the config inference and key mapping at real sizes.
- ``<m>_io.safetensors``: inputs, every residual, guess-mode residuals and the UNet output with the
  residuals (the tiny UNet of crates/diffusion/tests/fixtures).

Run: .venv-ref/bin/python tools/reference/controlnet_model.py   (byte-stable; CPU, 1 thread)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402

import diffusion_unet_vae as duv  # noqa: E402  (helpers: randomise_, randn, save_tensors, ...)
import ldm_layout  # noqa: E402

ROOT = HERE.parent.parent
UNETS = ROOT / "crates" / "diffusion" / "tests" / "fixtures"
OUT = ROOT / "crates" / "controlnet" / "tests" / "fixtures"

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)


def load_unet(name: str) -> UNet2DConditionModel:
    m = UNet2DConditionModel.from_pretrained(str(UNETS / name), torch_dtype=torch.float16)
    return m.to(torch.float32).eval().requires_grad_(False)


def build_sd15() -> ControlNetModel:
    cn = ControlNetModel.from_unet(load_unet("sd15"), conditioning_embedding_out_channels=(8, 16))
    duv.randomise_(cn, 7101)
    return cn.eval().requires_grad_(False)


def build_sdxl() -> ControlNetModel:
    unet = load_unet("sdxl").config
    cn = ControlNetModel(
        in_channels=4,
        down_block_types=unet.down_block_types,
        block_out_channels=unet.block_out_channels,
        layers_per_block=unet.layers_per_block,
        transformer_layers_per_block=[0, 0, 1],
        attention_head_dim=unet.attention_head_dim,
        cross_attention_dim=unet.cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=unet.addition_time_embed_dim,
        projection_class_embeddings_input_dim=unet.projection_class_embeddings_input_dim,
        conditioning_embedding_out_channels=(8, 16, 16),
        norm_num_groups=32,
    )
    duv.randomise_(cn, 7201)
    return cn.eval().requires_grad_(False)


def original_layout(cn: ControlNetModel) -> dict:
    """The lllyasviel layout of a diffusers ControlNet state dict (with `control_model.`)."""
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in cn.state_dict().items()}
    hint = cn.config.conditioning_embedding_out_channels
    num_blocks = 2 * (len(hint) - 1)
    names = original_names(sd, num_blocks)
    out = {k: sd[dk].reshape(shape) if shape is not None else sd[dk] for k, (dk, shape) in names.items()}
    original = {f"control_model.{k}": out[k] for k in sorted(out)}
    # diffusers' own converter must give the diffusers weights back, bit for bit. It hard-codes the
    # hint encoder of the released models (conv_out at input_hint_block.14), so the tiny (8, 16)
    # hint encoder is compared without its conv_out; its index rule is the one the committed
    # cond_embedding_original.safetensors fixture checks on the released 8-conv layout.
    back = convert_controlnet_checkpoint(original, dict(cn.config))
    hint_out = "controlnet_cond_embedding.conv_out."
    if num_blocks != 6:
        back = {k: v for k, v in back.items() if not k.startswith("controlnet_cond_embedding.blocks.2.")}
        sd = {k: v for k, v in sd.items() if not k.startswith(hint_out)}
    ldm_layout.assert_state_dicts_equal(back, sd, "convert_controlnet_checkpoint(original layout)")
    return original


def original_names(sd: dict, hint_blocks: int) -> dict:
    """Original (lllyasviel) key (without `control_model.`) -> (diffusers key, LDM shape or None
    for "as stored") for a diffusers ControlNet state dict; `hint_blocks` convs sit between the
    hint encoder's conv_in and conv_out."""
    encoder = {k: v for k, v in sd.items() if not k.startswith("controlnet_")}
    layout = ldm_layout.unet_ldm_layout(encoder)  # ldm key -> (diffusers key, shape)
    out = {ldm_key: (dk, shape) for ldm_key, (dk, shape) in layout.items()}
    for k in sd:
        if k.startswith("controlnet_cond_embedding."):
            module, param = k[len("controlnet_cond_embedding.") :].rsplit(".", 1)
            if module == "conv_in":
                index = 0
            elif module == "conv_out":
                index = 2 * (hint_blocks + 1)
            else:
                index = 2 * (int(module.split(".")[1]) + 1)
            out[f"input_hint_block.{index}.{param}"] = (k, None)
        elif k.startswith("controlnet_down_blocks."):
            i, param = k[len("controlnet_down_blocks.") :].split(".")
            out[f"zero_convs.{i}.0.{param}"] = (k, None)
        elif k.startswith("controlnet_mid_block."):
            out[f"middle_block_out.0.{k.rsplit('.', 1)[1]}"] = (k, None)
    assert len(out) == len(sd), (len(out), len(sd))
    return out


def full_size_layouts() -> dict:
    """Key names and shapes of full-size ControlNets (built on the meta device: no weights)."""
    with torch.device("meta"):
        sd15 = ControlNetModel(cross_attention_dim=768)  # lllyasviel/control_v11p_sd15_canny's config
        sdxl = ControlNetModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=[0, 1, 1],
            attention_head_dim=[5, 10, 20],
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    sd = {k: list(v.shape) for k, v in sd15.state_dict().items()}
    original = {f"control_model.{k}": list(shape) if shape is not None else sd[dk]
                for k, (dk, shape) in original_names(sd, 6).items()}
    config = lambda m: {k: v for k, v in dict(m.config).items() if not k.startswith("_")}  # noqa: E731
    return {
        "sd15_original": {"config": config(sd15), "shapes": dict(sorted(original.items()))},
        "sdxl_reduced_diffusers": {
            "config": config(sdxl),
            "shapes": {k: list(v.shape) for k, v in sorted(sdxl.state_dict().items())},
        },
    }


def run(cn: ControlNetModel, unet: UNet2DConditionModel, seed: int, sample_shape, image_shape, text_time: bool) -> dict:
    b = sample_shape[0]
    io = {
        "sample": duv.randn(seed + 1, sample_shape),
        "timestep": torch.tensor([999.0, 17.0])[:b],
        "encoder_hidden_states": duv.randn(seed + 2, (b, 7, unet.config.cross_attention_dim)),
        "controlnet_cond": duv.rand_uniform(seed + 3, image_shape, 0.0, 1.0),
    }
    added = None
    if text_time:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        io["text_embeds"] = duv.randn(seed + 4, (b, pooled))
        io["time_ids"] = torch.tensor([[64.0, 32.0, 0.0, 0.0, 64.0, 32.0], [80.0, 48.0, 4.0, 2.0, 64.0, 32.0]])[:b]
        added = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}
    args = (io["sample"], io["timestep"])
    kw = dict(encoder_hidden_states=io["encoder_hidden_states"], controlnet_cond=io["controlnet_cond"],
              added_cond_kwargs=added, return_dict=False)
    with torch.no_grad():
        down, mid = cn(*args, conditioning_scale=1.0, **kw)
        for i, d in enumerate(down):
            io[f"down_{i}"] = d
        io["mid"] = mid
        gdown, gmid = cn(*args, conditioning_scale=0.6, guess_mode=True, **kw)
        for i, d in enumerate(gdown):
            io[f"guess_down_{i}"] = d
        io["guess_mid"] = gmid
        scale = 0.7
        out = unet(io["sample"], io["timestep"], io["encoder_hidden_states"], added_cond_kwargs=added,
                   down_block_additional_residuals=[d * scale for d in down],
                   mid_block_additional_residual=mid * scale).sample
        io["unet_out_with_residuals"] = out
        io["residual_scale"] = torch.tensor([scale])
    for k, v in io.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    assert float(mid.abs().max()) > 1e-2, "mid residual is ~0"
    return io


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main() -> None:
    files = []
    sd15 = build_sd15()
    duv.save_diffusers_folder(sd15, OUT / "sd15_controlnet")
    files += [OUT / "sd15_controlnet" / "config.json", OUT / "sd15_controlnet" / duv.WEIGHTS_FILE]
    io = run(sd15, load_unet("sd15"), 7110, (2, 4, 16, 12), (2, 3, 32, 24), text_time=False)
    duv.save_tensors(OUT / "sd15_controlnet_io.safetensors", io)
    files.append(OUT / "sd15_controlnet_io.safetensors")

    original = original_layout(sd15)
    pth = OUT / "sd15_controlnet.pth"
    torch.save(original, str(pth))
    files.append(pth)

    layouts = OUT / "full_size_layouts.json"
    layouts.write_text(json.dumps(full_size_layouts(), indent=1, sort_keys=True) + "\n")
    files.append(layouts)

    sdxl = build_sdxl()
    duv.save_diffusers_folder(sdxl, OUT / "sdxl_controlnet")
    files += [OUT / "sdxl_controlnet" / "config.json", OUT / "sdxl_controlnet" / duv.WEIGHTS_FILE]
    io = run(sdxl, load_unet("sdxl"), 7210, (2, 4, 16, 8), (2, 3, 64, 32), text_time=True)
    duv.save_tensors(OUT / "sdxl_controlnet_io.safetensors", io)
    files.append(OUT / "sdxl_controlnet_io.safetensors")

    total = 0
    for p in files:
        total += p.stat().st_size
        print(f"{sha256(p)}  {p.relative_to(ROOT)}  ({p.stat().st_size} B)")
    print(f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
