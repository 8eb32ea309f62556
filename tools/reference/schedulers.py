"""Writes the scheduler parity fixtures of crates/diffusion/tests/schedulers.rs.

For each case (a diffusers scheduler class, a config, a step count) it records diffusers 0.42.1's
timesteps, sigmas, init_noise_sigma, and a rollout fed with fixed model outputs and, for the
stochastic schedulers, fixed noise (every `randn_tensor` call of the scheduler modules is
replaced by the next tensor of a fixed list, and the number of draws is recorded). Also:
add_noise, DDPM get_velocity, the img2img start index of the pipelines, and the configs diffusers
resolves for the A1111 sampler names.

    .venv-ref/bin/python tools/reference/schedulers.py

Deterministic: CPU, float32, fixed seeds; two runs give byte-identical files.
"""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
    scheduling_unipc_multistep,
)

assert diffusers.__version__ == "0.42.1", diffusers.__version__
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/diffusion/tests/fixtures/schedulers"
SHAPE = (1, 4, 8, 6)
MAX_STEPS = 25

CLASSES = {
    c.__name__: c
    for c in [
        DDIMScheduler,
        DDPMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        LCMScheduler,
    ]
}
WITH_SIGMAS = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
}
SCALES_INPUT = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"}


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


INPUTS = {
    "x_T": randn(1, *SHAPE),
    "model_outputs": randn(2, MAX_STEPS, *SHAPE),
    "noises": randn(3, MAX_STEPS + 1, *SHAPE),
    "x0": 0.8 * randn(4, *SHAPE),
    "noise0": randn(5, *SHAPE),
    "batch_original": 0.8 * randn(6, 2, *SHAPE[1:]),
    "batch_noise": randn(7, 2, *SHAPE[1:]),
}


class NoiseFeed:
    """Stands in for `randn_tensor` in the scheduler modules: hands out INPUTS["noises"] in order."""

    def __init__(self):
        self.count = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE, shape
        z = INPUTS["noises"][self.count].to(dtype or torch.float32)
        self.count += 1
        return z


FEED = NoiseFeed()
for module in [
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
    scheduling_unipc_multistep,
]:
    module.randn_tensor = FEED

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# (name, class, config, steps, extra): extra may hold `eta` (DDIM), `begin_index` (0: set as the
# SDXL pipeline does; needed where the first timestep repeats) and `strength` (img2img: the run
# starts at the pipelines' start index, from add_noise(x0, noise0, t_start)).
CASES = [
    ("ddim_sd_leading_10", "DDIMScheduler", {**SD, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}, 10, {}),
    ("ddim_v_trailing_zsnr_25", "DDIMScheduler", {**SD, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}, 25, {}),
    ("ddim_linear_clip_linspace_10", "DDIMScheduler", {"timestep_spacing": "linspace"}, 10, {}),
    ("ddim_eta1_sample_cosine_10", "DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "clip_sample_range": 0.9}, 10, {"eta": 1.0}),
    ("ddim_img2img_25", "DDIMScheduler", {**SD, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}, 25, {"strength": 0.6}),
    ("ddpm_default_10", "DDPMScheduler", {}, 10, {}),
    ("ddpm_v_trailing_small_log_25", "DDPMScheduler", {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "variance_type": "fixed_small_log", "clip_sample": False}, 25, {}),
    ("ddpm_cosine_linspace_large_10", "DDPMScheduler", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace", "variance_type": "fixed_large"}, 10, {}),
    ("euler_sd_leading_10", "EulerDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, 10, {}),
    ("euler_sd_linspace_25", "EulerDiscreteScheduler", {**SD}, 25, {}),
    ("euler_karras_v_10", "EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True, "prediction_type": "v_prediction"}, 10, {}),
    ("euler_karras_leading_25", "EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}, 25, {}),
    ("euler_zsnr_trailing_v_10", "EulerDiscreteScheduler", {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10, {}),
    ("euler_linear_sigma_min_10", "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min", "prediction_type": "sample"}, 10, {}),
    ("euler_continuous_v_10", "EulerDiscreteScheduler", {**SD, "timestep_type": "continuous", "prediction_type": "v_prediction", "use_karras_sigmas": True}, 10, {}),
    ("euler_img2img_25", "EulerDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}, 25, {"strength": 0.6}),
    ("euler_a_sd_linspace_10", "EulerAncestralDiscreteScheduler", {**SD}, 10, {}),
    ("euler_a_leading_v_25", "EulerAncestralDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"}, 25, {}),
    ("euler_a_zsnr_trailing_10", "EulerAncestralDiscreteScheduler", {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 10, {}),
    ("dpm_2m_10", "DPMSolverMultistepScheduler", {**SD}, 10, {}),
    ("dpm_2m_karras_25", "DPMSolverMultistepScheduler", {**SD, "use_karras_sigmas": True}, 25, {}),
    ("dpm_2m_sde_karras_25", "DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, 25, {}),
    ("dpm_2m_sde_karras_10", "DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, 10, {}),
    ("dpm_2m_v_trailing_10", "DPMSolverMultistepScheduler", {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 10, {}),
    ("dpm_3m_sde_heun_leading_25", "DPMSolverMultistepScheduler", {**SD, "solver_order": 3, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "timestep_spacing": "leading", "steps_offset": 1}, 25, {}),
    ("dpm_3m_sigma_min_25", "DPMSolverMultistepScheduler", {**SD, "solver_order": 3, "final_sigmas_type": "sigma_min"}, 25, {}),
    ("dpm_2m_heun_sigma_min_25", "DPMSolverMultistepScheduler", {**SD, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 25, {}),
    ("dpm_2m_cosine_karras_10", "DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True, "lower_order_final": False, "prediction_type": "sample"}, 10, {"begin_index": 0}),
    ("dpm_2m_zsnr_lambda_clip_10", "DPMSolverMultistepScheduler", {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "lambda_min_clipped": -5.1, "euler_at_final": True, "final_sigmas_type": "sigma_min"}, 10, {}),
    ("dpm_2m_sde_karras_img2img_25", "DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, 25, {"strength": 0.45}),
    # (bh1 with final_sigmas_type "zero" ends in NaN in diffusers: alpha_t * B_h * 0 with B_h = -inf.)
    ("unipc_10", "UniPCMultistepScheduler", {**SD}, 10, {}),
    ("unipc_karras_25", "UniPCMultistepScheduler", {**SD, "use_karras_sigmas": True}, 25, {}),
    ("unipc_v_trailing_bh1_10", "UniPCMultistepScheduler", {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 10, {}),
    ("unipc_order3_25", "UniPCMultistepScheduler", {**SD, "solver_order": 3}, 25, {}),
    ("unipc_eps_space_leading_10", "UniPCMultistepScheduler", {**SD, "predict_x0": False, "timestep_spacing": "leading", "steps_offset": 1, "final_sigmas_type": "sigma_min", "disable_corrector": [0, 3]}, 10, {}),
    ("unipc_karras_sigma_min_img2img_20", "UniPCMultistepScheduler", {**SD, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 20, {"strength": 0.7}),
    ("lcm_4", "LCMScheduler", {}, 4, {}),
    ("lcm_v_clip_10", "LCMScheduler", {"prediction_type": "v_prediction", "clip_sample": True, "original_inference_steps": 100, "timestep_scaling": 5.0}, 10, {}),
]

# SD 1.5's scheduler/scheduler_config.json (the base the A1111 sampler names are built from).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# diffusers' equivalent of each A1111 sampler name: Target.from_config(pipe.scheduler.config, **kwargs).
SAMPLERS = {
    "DDIM": (DDIMScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False, "solver_order": 2}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True, "solver_order": 2}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False, "solver_order": 2}),
    "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "solver_order": 2}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "LCM": (LCMScheduler, {}),
}


def plain(v):
    """A config value as JSON (non-finite floats as null, like serde_json writes them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return plain(v.tolist())
    return v


def resolved_config(sched):
    return {k: plain(v) for k, v in sorted(dict(sched.config).items()) if not k.startswith("_")}


def f64(values):
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def img2img_start(sched, steps, strength):
    """The pipeline's get_timesteps (it also calls set_begin_index where the scheduler has one)."""

    class Pipe:
        scheduler = sched

    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(Pipe(), steps, strength, "cpu")
    return len(sched.timesteps) - len(timesteps)


def run_case(name, cls_name, config, steps, extra, tensors):
    sched = CLASSES[cls_name](**config)
    sched.set_timesteps(steps)
    meta = {
        "name": name,
        "config": {"_class_name": cls_name, **config},
        "steps": steps,
        "resolved_config": resolved_config(sched),
    }
    tensors[f"{name}/timesteps"] = f64(sched.timesteps.tolist())
    if cls_name in WITH_SIGMAS:
        tensors[f"{name}/sigmas"] = sched.sigmas.to(torch.float32).clone()
    init_noise_sigma = sched.init_noise_sigma
    tensors[f"{name}/init_noise_sigma"] = f64([float(init_noise_sigma)])

    kwargs = {"eta": extra["eta"]} if "eta" in extra else {}
    if "eta" in extra:
        meta["eta"] = extra["eta"]
    FEED.count = 0
    if "strength" in extra:
        start = img2img_start(sched, steps, extra["strength"])
        meta["strength"] = extra["strength"]
        meta["start"] = start
        x = sched.add_noise(INPUTS["x0"], INPUTS["noise0"], sched.timesteps[start : start + 1])
    else:
        start = 0
        x = INPUTS["x_T"] * init_noise_sigma
    if "begin_index" in extra:
        sched.set_begin_index(extra["begin_index"])
        meta["begin_index"] = extra["begin_index"]
    samples, scaled = [], []
    for i, t in enumerate(sched.timesteps[start:]):
        scaled.append(sched.scale_model_input(x, t))
        assert cls_name in SCALES_INPUT or torch.equal(scaled[-1], x)
        x = sched.step(INPUTS["model_outputs"][i], t, x, **kwargs).prev_sample
        assert x.dtype == torch.float32
        samples.append(x)
    meta["noise_draws"] = FEED.count
    tensors[f"{name}/samples"] = torch.stack(samples).contiguous()
    if cls_name in SCALES_INPUT:
        tensors[f"{name}/scaled"] = torch.stack(scaled).contiguous()
    return meta


def add_noise_cases(tensors):
    """add_noise of DDPM / DDIM (one training timestep per batch item) and Euler (schedule
    timesteps, found by value), and DDPM's get_velocity."""
    original, noise = INPUTS["batch_original"], INPUTS["batch_noise"]
    out = []
    ddpm = DDPMScheduler(**SD)
    t = torch.tensor([17, 803])
    tensors["add_noise/ddpm"] = ddpm.add_noise(original, noise, t)
    tensors["get_velocity/ddpm"] = ddpm.get_velocity(original, noise, t)
    out.append({"name": "ddpm", "config": {"_class_name": "DDPMScheduler", **SD}, "timesteps": t.tolist()})
    ddim = DDIMScheduler(**SD, rescale_betas_zero_snr=True)
    t = torch.tensor([999, 999])
    tensors["add_noise/ddim"] = ddim.add_noise(original, noise, t)
    out.append({"name": "ddim", "config": {"_class_name": "DDIMScheduler", **SD, "rescale_betas_zero_snr": True}, "timesteps": t.tolist()})
    euler = EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    euler.set_timesteps(10)
    t = euler.timesteps[3:4].repeat(2)
    tensors["add_noise/euler"] = euler.add_noise(original, noise, t)
    out.append({"name": "euler", "config": {"_class_name": "EulerDiscreteScheduler", **SD, "use_karras_sigmas": True}, "steps": 10, "timestep_index": 3})
    return out


def alphas_cumprod_cases(tensors):
    """diffusers' float32 alphas_cumprod, to check the beta schedules bit for bit."""
    out = []
    for name, config in [
        ("linear", {}),
        ("scaled_linear", dict(SD)),
        ("squaredcos_cap_v2", {"beta_schedule": "squaredcos_cap_v2"}),
        ("scaled_linear_zsnr", {**SD, "rescale_betas_zero_snr": True}),
        ("linear_zsnr", {"rescale_betas_zero_snr": True}),
    ]:
        tensors[f"alphas_cumprod/{name}"] = DDPMScheduler(**config).alphas_cumprod.clone()
        out.append({"name": name, "config": {"_class_name": "DDPMScheduler", **config}})
    return out


def img2img_cases():
    out = []
    for steps in [1, 7, 10, 25, 30, 50]:
        for strength in [0.0, 0.05, 0.3, 0.45, 0.5, 0.6, 0.7, 0.75, 0.999, 1.0]:
            sched = EulerDiscreteScheduler(**SD)
            sched.set_timesteps(steps)
            out.append({"steps": steps, "strength": strength, "order": sched.order, "start": img2img_start(sched, steps, strength)})
    return out


def sampler_cases(tensors):
    with tempfile.TemporaryDirectory() as d:
        Path(d, "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG))
        base = PNDMScheduler.from_pretrained(d)
    out = []
    for sampler, (cls, kwargs) in SAMPLERS.items():
        sched = cls.from_config(base.config, **kwargs)
        steps = 4 if cls is LCMScheduler else 20
        sched.set_timesteps(steps)
        key = "sampler/" + sampler
        tensors[f"{key}/timesteps"] = f64(sched.timesteps.tolist())
        if cls.__name__ in WITH_SIGMAS:
            tensors[f"{key}/sigmas"] = sched.sigmas.to(torch.float32).clone()
        tensors[f"{key}/init_noise_sigma"] = f64([float(sched.init_noise_sigma)])
        out.append({"sampler": sampler, "class_name": cls.__name__, "steps": steps, "resolved_config": resolved_config(sched)})
    return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = {f"inputs/{k}": v.contiguous() for k, v in INPUTS.items()}
    cases = [run_case(*case, tensors) for case in CASES]
    fixture = {
        "diffusers": diffusers.__version__,
        "shape": list(SHAPE),
        "cases": cases,
        "add_noise": add_noise_cases(tensors),
        "alphas_cumprod": alphas_cumprod_cases(tensors),
        "img2img": img2img_cases(),
        "sd15_scheduler_config": SD15_SCHEDULER_CONFIG,
        "samplers": sampler_cases(tensors),
    }
    (OUT / "cases.json").write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
    save_file(tensors, str(OUT / "tensors.safetensors"))
    total = 0
    for p in sorted(OUT.iterdir()):
        size = p.stat().st_size
        total += size
        print(f"{size / 1e3:8.1f} kB  {p.relative_to(ROOT)}")
    print(f"{total / 1e3:8.1f} kB  total")


if __name__ == "__main__":
    main()
