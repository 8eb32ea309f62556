"""Parity fixture for one LoRA training step (`crates/lora/tests/train.rs`).

On the SD1.5-like UNet of `lora_apply.py` (crates/lora/tests/fixtures/apply/sd15_unet), a peft
LoRA (rank 4, alpha 2) on every Linear/Conv2d inside the Transformer2DModels (kohya's and
EasyPhoto's UNet targets) with seeded random down AND up weights (EasyPhoto's zero `up` would
make every `down` gradient zero), then one step of EasyPhoto's recipe on a fixed batch:
DDPM noising (scaled_linear 0.00085..0.012, 1000 steps) at fixed timesteps, MSE on epsilon,
backward, `clip_grad_norm_` (max norm chosen below the gradient norm so that clipping acts),
`torch.optim.AdamW` (betas 0.9/0.999, eps 1e-8, weight decay 1e-2).

crates/lora/tests/fixtures/train/
  vae/                    a tiny AutoencoderKL (one 32-channel block, no downsampling, float16
                          weights) for the Rust training-loop tests (not used by the step)
  step_init.safetensors   the initial LoRA in kohya naming (float32, alpha 2)
  step_io.safetensors     latents, noise, timesteps, encoder_hidden_states, loss, grad_norm,
                          max_norm, lr, `grad.<kohya name>.{down,up}` (before clipping) and
                          `after.<kohya name>.{down,up}` (after the AdamW step)

Usage: .venv-ref/bin/python tools/reference/lora_train_step.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_apply import randomise  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "lora" / "tests" / "fixtures"
RANK, ALPHA, LR = 4, 2.0, 1e-3


def add_lora(model: torch.nn.Module, prefix: str, unet: bool, gen: torch.Generator) -> dict:
    """peft LoRA on kohya's targets of `model`, random weights; the parameters by kohya name."""
    model.requires_grad_(False)
    targets = sorted(
        n for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        and ((unet and ".attentions." in n) or (not unet and (".self_attn." in n or ".mlp." in n)))
    )
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets), model)
    params = {}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" not in name:
                continue
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5 * (1.0 if "lora_A" in name else 0.3))
            p.requires_grad_(True)
            path, kind = name.split(".lora_")
            # kohya names come from transformers 4 paths, with the `text_model.` level.
            if not unet and not path.startswith("text_model."):
                path = f"text_model.{path}"
            params[f"{prefix}_{path.replace('.', '_')}.{'down' if kind.startswith('A') else 'up'}"] = p
    assert len(params) == 2 * len(targets)
    return params


def step_and_record(params: dict, loss: torch.Tensor, io: dict, stem: str) -> torch.Tensor:
    """After `loss.backward()`: records the initial LoRA (kohya names, alpha) and the gradients
    (zeros for a parameter the loss does not reach; AdamW leaves it untouched), clips at half
    the gradient norm, takes one AdamW step, records the updated weights, and writes
    `train/<stem>_init.safetensors` and `train/<stem>_io.safetensors`. Returns the gradient norm."""
    init = {}
    for key, p in params.items():
        io[f"grad.{key}"] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        module, kind = key.rsplit(".", 1)
        init[f"{module}.lora_{kind}.weight"] = p.detach().clone()
        init[f"{module}.alpha"] = torch.tensor(ALPHA)
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm(2) for p in params.values() if p.grad is not None]), 2)
    max_norm = 0.5 * grad_norm.item()
    total = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
    opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    opt.step()
    for key, p in params.items():
        io[f"after.{key}"] = p.detach().clone()
    io.update(loss=loss.detach().reshape(1), grad_norm=total.reshape(1), max_norm=torch.tensor([max_norm]),
              lr=torch.tensor([LR]))
    out = FIXTURES / "train"
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(init.items())), out / f"{stem}_init.safetensors")
    save_file({k: v.contiguous() for k, v in sorted(io.items())}, out / f"{stem}_io.safetensors")
    return grad_norm


def main() -> None:
    gen = torch.Generator().manual_seed(20261201)
    unet = UNet2DConditionModel.from_pretrained(FIXTURES / "apply" / "sd15_unet").float()
    params = add_lora(unet, "lora_unet", True, gen)

    latents = torch.randn((2, 4, 8, 8), generator=gen)
    noise = torch.randn((2, 4, 8, 8), generator=gen)
    timesteps = torch.tensor([17, 803])
    hidden = torch.randn((2, 6, 32), generator=gen)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    noisy = sched.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()

    io = {"latents": latents, "noise": noise, "timesteps": timesteps.float(), "encoder_hidden_states": hidden}
    grad_norm = step_and_record(params, loss, io, "step")
    out = FIXTURES / "train"
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=32)
    randomise(vae, gen)
    vae.half().save_pretrained(out / "vae")
    print(f"loss {loss.item():.6f}, grad norm {grad_norm.item():.6f}, {len(params) // 2} modules")


if __name__ == "__main__":
    main()
