#!/usr/bin/env python3
"""End-to-end fixtures for the ControlNet sampling of crates/controlnet.

Runs diffusers' ``StableDiffusionControlNetPipeline`` and ``StableDiffusionControlNetInpaintPipeline``
on the tiny components (UNet ``sd15`` and ``vae`` of crates/diffusion/tests/fixtures, the tiny
``sd15_controlnet`` written by ``controlnet_model.py``), CPU, float32, one thread, no text encoders
(prompt embeddings given), ``output_type="pt"``, DDIM (no per-step noise).

- ``txt2img_two_units``: MultiControlNet of the tiny ControlNet twice, with two control images,
  scales (0.7, 0.4) and guidance windows (0, 1) / (0.25, 0.75); initial latents given.
- ``sdxl_guess_mode``: ``StableDiffusionXLControlNetPipeline`` (UNet ``sdxl``, VAE ``vae3``, the tiny
  ``sdxl_controlnet``), 64×32, ``guess_mode=True`` (the ControlNet sees the conditional rows of
  ``text_embeds`` / ``time_ids`` only), scale 0.9, guidance window (0, 0.75), micro-conditioning
  original (80, 48), crop (4, 2), target (64, 32); initial latents given.
- ``inpaint_guess_mode``: the inpaint pipeline with the ordinary (4-channel) UNet, strength 0.75,
  ``guess_mode=True``, scale 0.8. Its three random draws (the VAE posterior of the image, the
  add_noise noise, the VAE posterior of the masked image) are made by a stand-in for
  ``randn_tensor`` from fixed seeds and saved as ``posterior_image``, ``add_noise``,
  ``posterior_masked_image``.

Run: .venv-ref/bin/python tools/reference/controlnet_pipelines.py  (after controlnet_model.py)
Writes crates/controlnet/tests/fixtures/pipelines/<case>.safetensors (byte-stable).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import diffusers.utils.torch_utils as torch_utils  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
import diffusers.models.autoencoders.vae  # noqa: E402,F401
import diffusers.pipelines.controlnet.pipeline_controlnet  # noqa: E402,F401
import diffusers.pipelines.controlnet.pipeline_controlnet_inpaint  # noqa: E402,F401

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DIFFUSION = ROOT / "crates" / "diffusion" / "tests" / "fixtures"
OUT = ROOT / "crates" / "controlnet" / "tests" / "fixtures" / "pipelines"
CONTROLNET = ROOT / "crates" / "controlnet" / "tests" / "fixtures" / "sd15_controlnet"
CONTROLNET_XL = ROOT / "crates" / "controlnet" / "tests" / "fixtures" / "sdxl_controlnet"

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()

SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
H, W, SEQ = 32, 24, 7


def randn(seed: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def smooth_image(seed: int) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1]: a random 4 x 3 grid, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, 4, 3), generator=g, dtype=torch.float32)
    return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1).contiguous()


class Draws:
    """Stands in for randn_tensor: named draws from fixed seeds, in call order."""

    def __init__(self, seed: int):
        self.seed, self.named = seed, {}

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None, **kw):
        names = [f.function for f in inspect.stack()[1:10]]
        if "prepare_mask_latents" in names:
            name = "posterior_masked_image"
        elif "_encode_vae_image" in names:
            name = "posterior_image"
        elif "prepare_latents" in names:
            name = "add_noise"
        else:
            raise AssertionError(f"unexpected draw from {names}")
        assert name not in self.named, name
        t = randn(self.seed + len(self.named), shape)
        self.named[name] = t
        return t.clone().to(dtype or torch.float32)


def patch(draws: Draws) -> None:
    for name, mod in list(sys.modules.items()):
        if name.startswith("diffusers") and mod is not None and hasattr(mod, "randn_tensor"):
            setattr(mod, "randn_tensor", draws)
    torch_utils.randn_tensor = draws


def load(cls, folder: Path):
    return cls.from_pretrained(str(folder), torch_dtype=torch.float16).to(torch.float32).eval().requires_grad_(False)


def run(pipe, kw: dict) -> dict:
    steps = []

    def on_step_end(p, i, t, k):
        steps.append(k["latents"].detach().clone())
        return {}

    with torch.no_grad():
        image = pipe(**kw, output_type="pt", callback_on_step_end=on_step_end).images
    return {"image_out": image, "latents_out": steps[-1], "step_latents": torch.cat(steps)}


def main() -> None:
    unet = load(UNet2DConditionModel, DIFFUSION / "sd15")
    vae = load(AutoencoderKL, DIFFUSION / "vae")
    cn = load(ControlNetModel, CONTROLNET)
    common = dict(vae=vae, text_encoder=None, tokenizer=None, unet=unet, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    OUT.mkdir(parents=True, exist_ok=True)
    files = []

    # ---------------------------------------------------------------- txt2img, two units
    s = 81000
    t = {
        "prompt_embeds": randn(s + 1, (1, SEQ, 32)),
        "negative_prompt_embeds": randn(s + 2, (1, SEQ, 32)),
        "latents": randn(s + 3, (1, 4, H // 2, W // 2)),
        "control_image_0": smooth_image(s + 4),
        "control_image_1": smooth_image(s + 5),
    }
    pipe = StableDiffusionControlNetPipeline(controlnet=[cn, cn], scheduler=DDIMScheduler(**SCHED), **common)
    pipe.set_progress_bar_config(disable=True)
    t.update(run(pipe, dict(
        prompt_embeds=t["prompt_embeds"], negative_prompt_embeds=t["negative_prompt_embeds"],
        latents=t["latents"].clone(), image=[t["control_image_0"], t["control_image_1"]],
        height=H, width=W, num_inference_steps=8, guidance_scale=7.5,
        controlnet_conditioning_scale=[0.7, 0.4], control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 0.75],
    )))
    files.append(OUT / "txt2img_two_units.safetensors")
    save_file({k: v.contiguous() for k, v in sorted(t.items())}, str(files[-1]))

    # ---------------------------------------------------------------- inpaint, guess mode
    s = 82000
    draws = Draws(s + 100)
    patch(draws)
    mask = torch.zeros((1, 1, H, W))
    mask[:, :, 7:23, 5:17] = 1.0
    t = {
        "prompt_embeds": randn(s + 1, (1, SEQ, 32)),
        "negative_prompt_embeds": randn(s + 2, (1, SEQ, 32)),
        "image": smooth_image(s + 3),
        "mask": mask,
        "control_image": smooth_image(s + 4),
    }
    pipe = StableDiffusionControlNetInpaintPipeline(controlnet=cn, scheduler=DDIMScheduler(**SCHED), **common)
    pipe.set_progress_bar_config(disable=True)
    t.update(run(pipe, dict(
        prompt_embeds=t["prompt_embeds"], negative_prompt_embeds=t["negative_prompt_embeds"],
        image=t["image"], mask_image=t["mask"], control_image=t["control_image"], height=H, width=W,
        strength=0.75, num_inference_steps=8, guidance_scale=7.5, controlnet_conditioning_scale=0.8, guess_mode=True,
    )))
    assert sorted(draws.named) == ["add_noise", "posterior_image", "posterior_masked_image"], sorted(draws.named)
    t.update(draws.named)
    files.append(OUT / "inpaint_guess_mode.safetensors")
    save_file({k: v.contiguous() for k, v in sorted(t.items())}, str(files[-1]))

    # ---------------------------------------------------------------- SDXL txt2img, guess mode
    s = 83000
    unet_xl = load(UNet2DConditionModel, DIFFUSION / "sdxl")
    vae3 = load(AutoencoderKL, DIFFUSION / "vae3")
    cn_xl = load(ControlNetModel, CONTROLNET_XL)
    t = {
        "prompt_embeds": randn(s + 1, (1, SEQ, 64)),
        "negative_prompt_embeds": randn(s + 2, (1, SEQ, 64)),
        "pooled_prompt_embeds": randn(s + 3, (1, 32)),
        "negative_pooled_prompt_embeds": randn(s + 4, (1, 32)),
        "latents": randn(s + 5, (1, 4, 16, 8)),
    }
    g = torch.Generator().manual_seed(s + 6)
    coarse = torch.rand((1, 3, 4, 3), generator=g, dtype=torch.float32)
    t["control_image"] = F.interpolate(coarse, size=(64, 32), mode="bilinear", align_corners=False).clamp(0, 1).contiguous()
    pipe = StableDiffusionXLControlNetPipeline(
        vae=vae3, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet_xl,
        controlnet=cn_xl, scheduler=DDIMScheduler(**SCHED), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    t.update(run(pipe, dict(
        prompt_embeds=t["prompt_embeds"], negative_prompt_embeds=t["negative_prompt_embeds"],
        pooled_prompt_embeds=t["pooled_prompt_embeds"], negative_pooled_prompt_embeds=t["negative_pooled_prompt_embeds"],
        latents=t["latents"].clone(), image=t["control_image"], height=64, width=32, num_inference_steps=8,
        guidance_scale=5.0, controlnet_conditioning_scale=0.9, guess_mode=True, control_guidance_end=0.75,
        original_size=(80, 48), crops_coords_top_left=(4, 2), target_size=(64, 32),
    )))
    files.append(OUT / "sdxl_guess_mode.safetensors")
    save_file({k: v.contiguous() for k, v in sorted(t.items())}, str(files[-1]))

    for p in files:
        print(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(ROOT)}  ({p.stat().st_size} B)")


if __name__ == "__main__":
    main()
