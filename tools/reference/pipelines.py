#!/usr/bin/env python3
"""End-to-end reference fixtures for the Stable Diffusion pipelines of crates/diffusion.

Runs diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline and StableDiffusionXLPipeline on the tiny
UNet / VAE fixtures written by ``diffusion_unet_vae.py`` (no text encoders: prompt embeddings are
given directly), on CPU in float32, and records for each case the inputs, every random draw the
pipeline / scheduler / VAE made (replayed from saved tensors), the final latents and the image.

Run from anywhere:  .venv-ref/bin/python tools/reference/pipelines.py
Needs:              crates/diffusion/tests/fixtures/{sd15,sdxl,inpaint,vae,vae3}, inpaint.ldm.ckpt
Output:             crates/diffusion/tests/fixtures/pipelines/<case>.{safetensors,json}
Deterministic: running it twice gives byte-identical files.

Every random draw goes through ``diffusers.utils.torch_utils.randn_tensor``. The script replaces that
function (in ``torch_utils`` and in every diffusers module that imported it by name) with one that
hands out the next tensor of a queue, asserting the requested shape, and records who asked. Each
case runs three times:

1. "generate": the queue makes each draw on demand (``randn`` from a per-case, per-draw seed); the
   draws, their shapes and purposes are recorded.
2. "replay": the pipeline runs again on exactly those saved tensors; its output must be bit-equal.
3. "mirror": a plain re-statement of the pipeline (pre/post-processing, CFG, inpaint blending)
   written in this file on the same UNet / VAE / scheduler objects and the same saved draws; it
   must be bit-equal too. This proves the formulas documented in the README / JSON.

Then the guidance scale is changed (replay) to show that the output depends on it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import diffusers.utils.torch_utils as torch_utils  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

# every module that may draw noise, imported before randn_tensor is patched
import diffusers.models.autoencoders.vae  # noqa: E402,F401
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion  # noqa: E402,F401
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img  # noqa: E402,F401
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint  # noqa: E402,F401
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl  # noqa: E402,F401
import diffusers.schedulers.scheduling_ddim  # noqa: E402,F401
import diffusers.schedulers.scheduling_dpmsolver_multistep  # noqa: E402,F401
import diffusers.schedulers.scheduling_euler_ancestral_discrete  # noqa: E402,F401
import diffusers.schedulers.scheduling_euler_discrete  # noqa: E402,F401

import warnings  # noqa: E402

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent.parent / "crates" / "diffusion" / "tests" / "fixtures"
OUT = FIXTURES / "pipelines"

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float32)
diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message="There are modules in")

# --------------------------------------------------------------------------- schedulers

# SD1.5's scheduler_config.json betas / offsets (as DDIMScheduler.from_config(sd15 scheduler) gives)
SD15_SCHED = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
)
# SDXL base scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHED = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    prediction_type="epsilon",
)

CASES = [
    dict(
        name="txt2img_sd15_ddim",
        pipeline="StableDiffusionPipeline",
        unet="sd15",
        vae="vae",
        scheduler=(DDIMScheduler, dict(SD15_SCHED, clip_sample=False, set_alpha_to_one=False)),
        steps=8,
        guidance=7.5,
        height=32,
        width=24,
        seed=70100,
    ),
    dict(
        name="txt2img_sd15_dpmpp_2m_sde_karras",
        pipeline="StableDiffusionPipeline",
        unet="sd15",
        vae="vae",
        scheduler=(
            DPMSolverMultistepScheduler,
            dict(SD15_SCHED, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_order=2),
        ),
        steps=10,
        guidance=7.5,
        height=32,
        width=24,
        seed=70200,
    ),
    dict(
        name="txt2img_sd15_euler_a",
        pipeline="StableDiffusionPipeline",
        unet="sd15",
        vae="vae",
        scheduler=(EulerAncestralDiscreteScheduler, dict(SD15_SCHED)),
        steps=8,
        guidance=5.0,
        height=32,
        width=24,
        seed=70300,
    ),
    dict(
        name="img2img_sd15_euler",
        pipeline="StableDiffusionImg2ImgPipeline",
        unet="sd15",
        vae="vae",
        scheduler=(EulerDiscreteScheduler, dict(SD15_SCHED)),
        steps=10,
        strength=0.6,
        guidance=7.0,
        height=32,
        width=24,
        seed=70400,
    ),
    dict(
        name="inpaint_sd15_9ch",
        pipeline="StableDiffusionInpaintPipeline",
        unet="inpaint",
        vae="vae",
        scheduler=(DDIMScheduler, dict(SD15_SCHED, clip_sample=False, set_alpha_to_one=False)),
        steps=8,
        strength=1.0,
        guidance=7.5,
        height=32,
        width=24,
        seed=70500,
    ),
    dict(
        name="inpaint_sd15_4ch",
        pipeline="StableDiffusionInpaintPipeline",
        unet="sd15",
        vae="vae",
        scheduler=(
            DPMSolverMultistepScheduler,
            dict(SD15_SCHED, algorithm_type="dpmsolver++", use_karras_sigmas=True, solver_order=2),
        ),
        steps=10,
        strength=0.75,
        guidance=7.5,
        height=32,
        width=24,
        seed=70600,
    ),
    dict(
        name="txt2img_sdxl_euler",
        pipeline="StableDiffusionXLPipeline",
        unet="sdxl",
        vae="vae3",
        scheduler=(EulerDiscreteScheduler, dict(SDXL_SCHED)),
        steps=8,
        guidance=5.0,
        height=64,
        width=32,
        original_size=(80, 48),
        crops_coords_top_left=(4, 2),
        target_size=(64, 32),
        seed=70700,
    ),
]

SEQ_LEN = 7
# mask rectangle (image pixels, inclusive-exclusive). Its edges are odd so that the nearest-neighbour
# resize to the latent grid (which samples pixel 2*j) differs from any pooling / area resize.
MASK_ROWS = (7, 23)
MASK_COLS = (5, 17)

# --------------------------------------------------------------------------- helpers


def randn(seed: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def smooth_image(seed: int, h: int, w: int) -> torch.Tensor:
    """[1, 3, h, w] in [0, 1]: a 4 x 3 random grid, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, 4, 3), generator=g, dtype=torch.float32)
    img = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return img.clamp(0.0, 1.0).contiguous()


def rect_mask(h: int, w: int) -> torch.Tensor:
    m = torch.zeros((1, 1, h, w), dtype=torch.float32)
    m[:, :, MASK_ROWS[0] : MASK_ROWS[1], MASK_COLS[0] : MASK_COLS[1]] = 1.0
    return m


def jsonable(v):
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return jsonable(v.tolist())
    if isinstance(v, float):
        # strict JSON (serde_json) has no Infinity / NaN: diffusers' lambda_min_clipped = -inf
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return v
    if isinstance(v, (int, bool, str)) or v is None:
        return v
    if hasattr(v, "item"):
        return jsonable(v.item())
    return str(v)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- noise queue


class NoiseQueue:
    """Stands in for randn_tensor: hands out the next tensor (generated on demand or replayed)."""

    def __init__(self, seed: int | None = None, saved: list | None = None):
        assert (seed is None) != (saved is None)
        self.seed = seed
        self.saved = saved
        self.draws: list[dict] = []  # shape, purpose, caller
        self.tensors: list[torch.Tensor] = []

    def take(self, shape, purpose: str, caller: str) -> torch.Tensor:
        k = len(self.tensors)
        shape = tuple(int(s) for s in shape)
        if self.saved is not None:
            assert k < len(self.saved), f"draw {k} ({purpose}) beyond the {len(self.saved)} saved draws"
            t = self.saved[k]
            assert tuple(t.shape) == shape, f"draw {k} ({purpose}): requested {shape}, saved {tuple(t.shape)}"
        else:
            t = randn(self.seed + 100 + k, shape)
        self.tensors.append(t)
        self.draws.append({"name": f"noise_{k}", "shape": list(shape), "purpose": purpose, "caller": caller})
        return t.clone()

    def finish(self) -> None:
        if self.saved is not None:
            assert len(self.tensors) == len(self.saved), f"used {len(self.tensors)} of {len(self.saved)} draws"


ACTIVE: dict = {"queue": None, "case": None}
_ORIGINAL_RANDN = torch_utils.randn_tensor


def _purpose_from_stack() -> tuple[str, str]:
    """What the pipeline was doing when it asked for noise (from the Python call stack)."""
    frames = inspect.stack()[2:]
    f0 = frames[0]
    mod = f0.frame.f_globals.get("__name__", "?")
    fn = f0.function
    owner = f0.frame.f_locals.get("self")
    caller = f"{mod}.{type(owner).__name__ + '.' if owner is not None else ''}{fn}"
    names = [fr.function for fr in frames[:8]]
    case = ACTIVE["case"]
    if fn == "sample" and mod.endswith("autoencoders.vae"):
        if "prepare_mask_latents" in names:
            return "posterior sample (masked image)", caller
        return "posterior sample (init image)", caller
    if fn == "step":
        sched = owner
        begin = getattr(sched, "begin_index", None) or 0
        i = int(sched.step_index) - begin
        t = f0.frame.f_locals.get("timestep")
        return f"step {i} (t = {jsonable(t)})", caller
    if fn == "prepare_latents":
        if case["pipeline"] == "StableDiffusionImg2ImgPipeline":
            return "add_noise", caller
        if case["pipeline"] == "StableDiffusionInpaintPipeline" and case.get("strength", 1.0) < 1.0:
            return "add_noise (also the noise of every init_latents_proper blend)", caller
        return "initial latents", caller
    raise AssertionError(f"unexpected randn_tensor caller {caller} via {names}")


def fake_randn_tensor(shape, generator=None, device=None, dtype=None, layout=None, **kwargs):
    q = ACTIVE["queue"]
    assert q is not None, "randn_tensor called outside a case"
    purpose, caller = _purpose_from_stack()
    t = q.take(shape, purpose, caller)
    return t.to(dtype=dtype or torch.float32)


def install_randn_patch() -> list[str]:
    """Replace randn_tensor everywhere diffusers holds a reference to it."""
    patched = []
    torch_utils.randn_tensor = fake_randn_tensor
    patched.append("diffusers.utils.torch_utils")
    for name, mod in sorted(sys.modules.items()):
        if not name.startswith("diffusers") or mod is None:
            continue
        if getattr(mod, "randn_tensor", None) is _ORIGINAL_RANDN:
            setattr(mod, "randn_tensor", fake_randn_tensor)
            patched.append(name)
    return patched


# --------------------------------------------------------------------------- components


def load_unet(name: str) -> UNet2DConditionModel:
    folder = FIXTURES / name
    if name == "inpaint":
        m = UNet2DConditionModel.from_single_file(
            str(FIXTURES / "inpaint.ldm.ckpt"), config=str(folder), torch_dtype=torch.float16
        )
    else:
        m = UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=torch.float16)
    return m.to(torch.float32).eval().requires_grad_(False)


def load_vae(name: str) -> AutoencoderKL:
    m = AutoencoderKL.from_pretrained(str(FIXTURES / name), torch_dtype=torch.float16)
    return m.to(torch.float32).eval().requires_grad_(False)


def component_files(case) -> list[Path]:
    u, v = case["unet"], case["vae"]
    files = [FIXTURES / u / "config.json"]
    files.append(FIXTURES / "inpaint.ldm.ckpt" if u == "inpaint" else FIXTURES / u / "diffusion_pytorch_model.safetensors")
    files += [FIXTURES / v / "config.json", FIXTURES / v / "diffusion_pytorch_model.safetensors"]
    return files


def make_scheduler(case):
    cls, cfg = case["scheduler"]
    return cls(**cfg)


def build_pipeline(case, unet, vae, scheduler):
    if case["pipeline"] == "StableDiffusionXLPipeline":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        cls = {
            "StableDiffusionPipeline": StableDiffusionPipeline,
            "StableDiffusionImg2ImgPipeline": StableDiffusionImg2ImgPipeline,
            "StableDiffusionInpaintPipeline": StableDiffusionInpaintPipeline,
        }[case["pipeline"]]
        pipe = cls(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def case_inputs(case, unet, vae) -> dict:
    s = case["seed"]
    cross = unet.config.cross_attention_dim
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = case["height"], case["width"]
    x = {
        "prompt_embeds": randn(s + 1, (1, SEQ_LEN, cross)),
        "negative_prompt_embeds": randn(s + 2, (1, SEQ_LEN, cross)),
    }
    if case["pipeline"] == "StableDiffusionXLPipeline":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        x["pooled_prompt_embeds"] = randn(s + 3, (1, pooled))
        x["negative_pooled_prompt_embeds"] = randn(s + 4, (1, pooled))
    if case["pipeline"] in ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"):
        x["image"] = smooth_image(s + 5, h, w)
    if case["pipeline"] == "StableDiffusionInpaintPipeline":
        x["mask"] = rect_mask(h, w)
    # Initial latents are passed where the pipeline uses them as they are: txt2img, and inpaint at
    # strength 1. Img2img (and inpaint at strength < 1) build them from the image + add_noise noise;
    # an inpaint pipeline given `latents` at strength < 1 would start from pure noise, ignoring the image.
    if case["pipeline"] in ("StableDiffusionPipeline", "StableDiffusionXLPipeline") or (
        case["pipeline"] == "StableDiffusionInpaintPipeline" and case.get("strength", 1.0) == 1.0
    ):
        x["latents"] = randn(s + 6, (1, vae.config.latent_channels, h // f, w // f))
    return x


# --------------------------------------------------------------------------- running diffusers


def run_pipeline(case, unet, vae, inputs: dict, queue: NoiseQueue, guidance: float | None = None) -> dict:
    scheduler = make_scheduler(case)
    pipe = build_pipeline(case, unet, vae, scheduler)
    step_latents: list[torch.Tensor] = []
    unet_calls: list[dict] = []
    extra: dict = {}

    def on_step_end(p, i, t, kw):
        step_latents.append(kw["latents"].detach().clone())
        if "add_time_ids" in kw:
            extra["add_time_ids"] = kw["add_time_ids"].detach().clone()
            extra["add_text_embeds"] = kw["add_text_embeds"].detach().clone()
        return {}

    def pre_hook(module, args, kwargs):
        sample, t = args[0], args[1]
        rec = {"t": t.detach().clone() if isinstance(t, torch.Tensor) else torch.tensor(t)}
        if not unet_calls:
            rec["sample"] = sample.detach().clone()
        unet_calls.append(rec)
        return None

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    kw = dict(
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"] if guidance is None else guidance,
        output_type="pt",
        prompt_embeds=inputs["prompt_embeds"].clone(),
        negative_prompt_embeds=inputs["negative_prompt_embeds"].clone(),
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    p = case["pipeline"]
    if p in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionInpaintPipeline"):
        kw.update(height=case["height"], width=case["width"])
    if "latents" in inputs:
        kw["latents"] = inputs["latents"].clone()
    if p == "StableDiffusionImg2ImgPipeline":
        kw.update(image=inputs["image"].clone(), strength=case["strength"])
    if p == "StableDiffusionInpaintPipeline":
        kw.update(image=inputs["image"].clone(), mask_image=inputs["mask"].clone(), strength=case["strength"])
    if p == "StableDiffusionXLPipeline":
        kw.update(
            pooled_prompt_embeds=inputs["pooled_prompt_embeds"].clone(),
            negative_pooled_prompt_embeds=inputs["negative_pooled_prompt_embeds"].clone(),
            original_size=case["original_size"],
            crops_coords_top_left=case["crops_coords_top_left"],
            target_size=case["target_size"],
            callback_on_step_end_tensor_inputs=["latents", "add_time_ids", "add_text_embeds"],
        )
    ACTIVE["queue"], ACTIVE["case"] = queue, case
    try:
        with torch.no_grad():
            out = pipe(**kw)
    finally:
        ACTIVE["queue"], ACTIVE["case"] = None, None
        handle.remove()
    queue.finish()
    image = out.images
    assert isinstance(image, torch.Tensor) and image.ndim == 4, type(image)
    return {
        "pipe": pipe,
        "scheduler": scheduler,
        "image": image.detach().clone(),
        "step_latents": step_latents,
        "unet_calls": unet_calls,
        "extra": extra,
    }


# --------------------------------------------------------------------------- mirror (plain re-statement)


def mirror(case, unet, vae, inputs: dict, noises: list[torch.Tensor]) -> dict:
    """The pipeline written out by hand on the same components and draws (bit-equal expected)."""
    queue = NoiseQueue(saved=list(noises))
    sched = make_scheduler(case)
    sf = vae.config.scaling_factor
    g = case["guidance"]
    n = case["steps"]
    p = case["pipeline"]
    sched.set_timesteps(n, device="cpu")
    timesteps = sched.timesteps
    strength = case.get("strength", 1.0)
    if p in ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"):
        t_start = n - min(int(n * strength), n)
        timesteps = timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
    elif p == "StableDiffusionXLPipeline":
        sched.set_begin_index(0)

    def take(shape, purpose):
        return queue.take(shape, purpose, "mirror")

    def posterior(img, purpose):
        # vae.encode(img).latent_dist.sample(): mean + exp(0.5 * clamp(logvar, -30, 20)) * noise
        dist = vae.encode(img).latent_dist
        return sf * (dist.mean + dist.std * take(dist.mean.shape, purpose))

    cond = torch.cat([inputs["negative_prompt_embeds"], inputs["prompt_embeds"]])  # [uncond, cond]
    added = None
    if p == "StableDiffusionXLPipeline":
        ids = list(case["original_size"]) + list(case["crops_coords_top_left"]) + list(case["target_size"])
        time_ids = torch.tensor([ids], dtype=torch.float32)
        added = {
            "text_embeds": torch.cat([inputs["negative_pooled_prompt_embeds"], inputs["pooled_prompt_embeds"]]),
            "time_ids": torch.cat([time_ids, time_ids]),
        }

    mask_l = masked_l = image_latents = noise = None
    if p == "StableDiffusionImg2ImgPipeline":
        img = inputs["image"] * 2.0 - 1.0
        x0 = posterior(img, "posterior sample (init image)")
        noise = take(x0.shape, "add_noise")
        latents = sched.add_noise(x0, noise, timesteps[:1])
    elif p == "StableDiffusionInpaintPipeline":
        img = inputs["image"] * 2.0 - 1.0
        mask = (inputs["mask"] >= 0.5).to(torch.float32)  # binarize
        if unet.config.in_channels == 4:
            image_latents = posterior(img, "posterior sample (init image)")
        if strength == 1.0:
            noise = inputs["latents"]
            latents = noise * sched.init_noise_sigma
        else:
            noise = take(image_latents.shape, "add_noise (also the noise of every init_latents_proper blend)")
            latents = sched.add_noise(image_latents, noise, timesteps[:1])
        masked = img * (mask < 0.5)
        h, w = latents.shape[-2:]
        mask_l = F.interpolate(mask, size=(h, w))  # nearest: latent (i, j) <- pixel (f*i, f*j)
        masked_l = posterior(masked, "posterior sample (masked image)")
    else:
        latents = inputs["latents"] * sched.init_noise_sigma

    step_latents = []
    for i, t in enumerate(timesteps):
        x = sched.scale_model_input(torch.cat([latents, latents]), t)
        if unet.config.in_channels == 9:
            x = torch.cat([x, torch.cat([mask_l, mask_l]), torch.cat([masked_l, masked_l])], dim=1)
        eps = unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + g * (eps_c - eps_u)
        # stochastic schedulers draw their step noise through randn_tensor (patched: this queue)
        ACTIVE["queue"], ACTIVE["case"] = queue, case
        try:
            latents = sched.step(eps, t, latents).prev_sample
        finally:
            ACTIVE["queue"], ACTIVE["case"] = None, None
        if p == "StableDiffusionInpaintPipeline" and unet.config.in_channels == 4:
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = sched.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - mask_l) * proper + mask_l * latents
        step_latents.append(latents.clone())
    queue.finish()
    decoded = vae.decode(latents / sf).sample
    image = (decoded * 0.5 + 0.5).clamp(0, 1)
    return {"image": image, "latents": latents, "step_latents": step_latents, "draws": queue.draws}


# --------------------------------------------------------------------------- one case


def scheduler_record(case, scheduler) -> dict:
    cfg = {k: v for k, v in dict(scheduler.config).items() if k != "_use_default_values"}
    cfg["_class_name"] = type(scheduler).__name__
    return jsonable(dict(sorted(cfg.items())))


def write_case(case, unet, vae) -> list[Path]:
    name = case["name"]
    print(f"[{name}]")
    inputs = case_inputs(case, unet, vae)

    # 1. generate
    q1 = NoiseQueue(seed=case["seed"])
    r1 = run_pipeline(case, unet, vae, inputs, q1)
    noises = [t.clone() for t in q1.tensors]
    # 2. replay the saved draws
    q2 = NoiseQueue(saved=noises)
    r2 = run_pipeline(case, unet, vae, inputs, q2)
    assert torch.equal(r1["image"], r2["image"]), f"{name}: replay differs"
    assert [d["purpose"] for d in q1.draws] == [d["purpose"] for d in q2.draws]
    image = r1["image"]
    latents_out = r1["step_latents"][-1]
    for a, b in zip(r1["step_latents"], r2["step_latents"]):
        assert torch.equal(a, b)

    # decode(latents_out / scaling) reproduces the image
    with torch.no_grad():
        dec = (vae.decode(latents_out / vae.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
    assert torch.equal(dec, image), f"{name}: latents_out does not decode to image_out"

    # 3. mirror
    with torch.no_grad():
        m = mirror(case, unet, vae, inputs, noises)
    assert [d["purpose"] for d in m["draws"]] == [d["purpose"] for d in q1.draws], (
        [d["purpose"] for d in m["draws"]],
        [d["purpose"] for d in q1.draws],
    )
    assert len(m["step_latents"]) == len(r1["step_latents"])
    for i, (a, b) in enumerate(zip(m["step_latents"], r1["step_latents"])):
        assert torch.equal(a, b), f"{name}: mirror step {i} differs by {(a - b).abs().max()}"
    assert torch.equal(m["image"], image), f"{name}: mirror image differs by {(m['image'] - image).abs().max()}"

    # non-trivial output; guidance matters
    assert tuple(image.shape) == (1, 3, case["height"], case["width"]), image.shape
    std = float(image.std())
    assert std > 0.01, f"{name}: image std {std}"
    frac_clamped = float(((image == 0) | (image == 1)).float().mean())
    r3 = run_pipeline(case, unet, vae, inputs, NoiseQueue(saved=noises), guidance=case["guidance"] + 2.0)
    gdiff = float((r3["image"] - image).abs().max())
    assert gdiff > 1e-3, f"{name}: guidance change moved the image by only {gdiff}"
    print(f"  image std {std:.4f}, clamped {frac_clamped:.3f}, guidance +2 changes it by up to {gdiff:.4f}")

    # ---------------------------------------------------------------- save tensors
    tensors = dict(inputs)
    for k, t in enumerate(noises):
        tensors[f"noise_{k}"] = t
    tensors["image_out"] = image
    tensors["latents_out"] = latents_out
    tensors["step_latents"] = torch.cat(r1["step_latents"], dim=0)
    tensors["unet_input_0"] = r1["unet_calls"][0]["sample"]
    if "add_time_ids" in r1["extra"]:
        tensors["add_time_ids"] = r1["extra"]["add_time_ids"]
    for k, v in tensors.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    OUT.mkdir(parents=True, exist_ok=True)
    st_path = OUT / f"{name}.safetensors"
    save_file({k: tensors[k].detach().clone().contiguous() for k in sorted(tensors)}, str(st_path))

    # ---------------------------------------------------------------- JSON
    sched = r1["scheduler"]
    pipe = r1["pipe"]
    f = pipe.vae_scale_factor
    timesteps = [c["t"] for c in r1["unet_calls"]]
    rec = {
        "case": name,
        "pipeline": case["pipeline"],
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "unet": case["unet"],
        "unet_weights": "inpaint.ldm.ckpt" if case["unet"] == "inpaint" else f"{case['unet']}/diffusion_pytorch_model.safetensors",
        "vae": case["vae"],
        # the component files these numbers were computed with (a changed file makes the case stale)
        "components_sha256": {
            str(q.relative_to(FIXTURES)): sha256(q)
            for q in component_files(case)
        },
        "vae_scale_factor": f,
        "vae_scaling_factor": vae.config.scaling_factor,
        "vae_force_upcast": vae.config.force_upcast,
        "scheduler": scheduler_record(case, sched),
        "scheduler_order": sched.order,
        "init_noise_sigma": float(sched.init_noise_sigma),
        "num_inference_steps": case["steps"],
        "guidance_scale": case["guidance"],
        "strength": case.get("strength"),
        "height": case["height"],
        "width": case["width"],
        "latent_shape": list(latents_out.shape),
        "scheduler_timesteps_full": jsonable(sched.timesteps),
        "timesteps": [jsonable(t) for t in timesteps],
        "timestep_dtype": str(timesteps[0].dtype).replace("torch.", ""),
        "begin_index": getattr(sched, "begin_index", None),
        "noise_draws": [
            {"name": d["name"], "shape": d["shape"], "purpose": d["purpose"], "caller": d["caller"]} for d in q1.draws
        ],
        "inputs": sorted(inputs),
        "outputs": {
            "image_out": "final image, postprocess(vae.decode(latents_out / vae_scaling_factor)) = (x * 0.5 + 0.5).clamp(0, 1)",
            "latents_out": "final latents (the callback_on_step_end latents of the last step; for 4-channel inpaint after the blend)",
            "step_latents": "[steps, 4, h, w]: latents after each step (as seen by callback_on_step_end)",
            "unet_input_0": "the UNet's sample input at the first step: CFG batch [uncond, cond], after scale_model_input (and for 9-channel inpaint the concat [latents, mask, masked_image_latents])",
        },
        "cfg_batch_order": "[negative/uncond, positive/cond]",
        "guidance_formula": "eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)",
    }
    if hasattr(sched, "sigmas"):
        rec["scheduler_sigmas"] = jsonable(sched.sigmas.to(torch.float32))
    if case["pipeline"] in ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"):
        n = case["steps"]
        init_timestep = min(int(n * case["strength"]), n)
        rec["t_start"] = max(n - init_timestep, 0)
        rec["latent_timestep"] = jsonable(timesteps[0])
    if case["pipeline"] == "StableDiffusionInpaintPipeline":
        rec["mask_rect"] = {"rows": list(MASK_ROWS), "cols": list(MASK_COLS), "value": "1 = repaint"}
        rec["unet_in_channels"] = unet.config.in_channels
    if case["pipeline"] == "StableDiffusionXLPipeline":
        ids = r1["extra"]["add_time_ids"]
        rec.update(
            original_size=list(case["original_size"]),
            crops_coords_top_left=list(case["crops_coords_top_left"]),
            target_size=list(case["target_size"]),
            add_time_ids=jsonable(ids),
            add_time_ids_dtype=str(ids.dtype).replace("torch.", ""),
            add_time_ids_layout="[orig_h, orig_w, crop_top, crop_left, target_h, target_w] per row; rows [uncond, cond]; negative_* sizes default to the positive ones",
            force_zeros_for_empty_prompt=bool(pipe.config.force_zeros_for_empty_prompt),
            text_encoder_projection_dim=int(inputs["pooled_prompt_embeds"].shape[-1]),
            add_watermarker=False,
        )
        assert torch.equal(r1["extra"]["add_text_embeds"], torch.cat([inputs["negative_pooled_prompt_embeds"], inputs["pooled_prompt_embeds"]]))
    js_path = OUT / f"{name}.json"
    js_path.write_text(json.dumps(jsonable(rec), indent=2, allow_nan=False) + "\n")
    for d in q1.draws:
        print(f"  {d['name']}: {d['shape']} {d['purpose']}")
    return [st_path, js_path]


def main() -> None:
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}; writing {OUT}")
    unets = {n: load_unet(n) for n in sorted({c["unet"] for c in CASES})}
    vaes = {n: load_vae(n) for n in sorted({c["vae"] for c in CASES})}
    patched = install_randn_patch()
    for must in (
        "diffusers.models.autoencoders.vae",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
        "diffusers.schedulers.scheduling_dpmsolver_multistep",
        "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    ):
        assert must in patched, must

    files = []
    for case in CASES:
        files += write_case(case, unets[case["unet"]], vaes[case["vae"]])
    stale = sorted(set(OUT.iterdir()) - set(files))
    for p in stale:
        print(f"removing stale {p.name}")
        p.unlink()

    print("\nfixture sizes / sha256:")
    total = 0
    for p in sorted(files):
        total += p.stat().st_size
        print(f"{sha256(p)}  {p.relative_to(FIXTURES.parent.parent.parent.parent)}  ({p.stat().st_size} B)")
    print(f"total {total} B ({total / 1e6:.3f} MB)")
    assert total < 1_000_000, "pipeline fixtures exceed 1 MB"


if __name__ == "__main__":
    main()
