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


def main() -> None:
    gen = torch.Generator().manual_seed(20261201)
    unet = UNet2DConditionModel.from_pretrained(FIXTURES / "apply" / "sd15_unet").float()
    unet.requires_grad_(False)
    targets = sorted(
        n for n, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".attentions." in n
    )
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets), unet)
    params = {}
    with torch.no_grad():
        for name, p in sorted(unet.named_parameters()):
            if "lora_" in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5 * (1.0 if "lora_A" in name else 0.3))
                p.requires_grad_(True)
                path, kind = name.split(".lora_")
                key = f"lora_unet_{path.replace('.', '_')}.{'down' if kind.startswith('A') else 'up'}"
                params[key] = p
    assert len(params) == 2 * len(targets)

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
    init = {}
    for key, p in params.items():
        io[f"grad.{key}"] = p.grad.detach().clone()
        module, kind = key.rsplit(".", 1)
        init[f"{module}.lora_{kind}.weight"] = p.detach().clone()
        init[f"{module}.alpha"] = torch.tensor(ALPHA)
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm(2) for p in params.values()]), 2)
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
    save_file(dict(sorted(init.items())), out / "step_init.safetensors")
    save_file({k: v.contiguous() for k, v in sorted(io.items())}, out / "step_io.safetensors")
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4, norm_num_groups=32)
    randomise(vae, gen)
    vae.half().save_pretrained(out / "vae")
    print(f"loss {loss.item():.6f}, grad norm {grad_norm.item():.6f}, {len(targets)} modules")


if __name__ == "__main__":
    main()
