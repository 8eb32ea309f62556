"""Parity fixture for one SDXL LoRA training step (`crates/lora/tests/train.rs`).

On the SDXL-like UNet and the two text encoders of `lora_apply.py`
(crates/lora/tests/fixtures/apply/sdxl_{unet,te1,te2}), peft LoRAs (rank 4, alpha 2) on kohya's
targets (every Linear/Conv2d inside the UNet's Transformer2DModels, every Linear of the text
encoders' attention and MLP blocks) with seeded random down AND up weights, then one step of
kohya's SDXL recipe on a fixed batch: the text conditioning is the penultimate hidden states of
both encoders concatenated plus the second encoder's projected pooled output (`text_embeds`),
the micro-conditioning `time_ids` (original size, crop top-left, target size) go into the UNet
with it; DDPM noising at fixed timesteps, MSE on epsilon, backward through the UNet and both
encoders, `clip_grad_norm_` (max norm below the gradient norm), `torch.optim.AdamW` (betas
0.9/0.999, eps 1e-8, weight decay 1e-2).

crates/lora/tests/fixtures/train/
  sdxl_step_init.safetensors  the initial LoRA in kohya naming (lora_unet_, lora_te1_, lora_te2_;
                              float32, alpha 2)
  sdxl_step_io.safetensors    input_ids, latents, noise, timesteps, time_ids, loss, grad_norm,
                              max_norm, lr, `grad.<kohya name>.{down,up}` (before clipping) and
                              `after.<kohya name>.{down,up}` (after the AdamW step)

Usage: .venv-ref/bin/python tools/reference/lora_train_step_sdxl.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_train_step import FIXTURES, add_lora, step_and_record  # noqa: E402 (also sets torch's threads and determinism)


def main() -> None:
    gen = torch.Generator().manual_seed(20261202)
    apply = FIXTURES / "apply"
    unet = UNet2DConditionModel.from_pretrained(apply / "sdxl_unet").float()
    te1 = CLIPTextModel.from_pretrained(apply / "sdxl_te1").float()
    te2 = CLIPTextModelWithProjection.from_pretrained(apply / "sdxl_te2").float()
    params = {}
    for model, prefix, is_unet in ((unet, "lora_unet", True), (te1, "lora_te1", False), (te2, "lora_te2", False)):
        params.update(add_lora(model, prefix, is_unet, gen))

    input_ids = torch.randint(0, 1000, (2, 7), generator=gen)
    latents = torch.randn((2, 4, 8, 8), generator=gen)
    noise = torch.randn((2, 4, 8, 8), generator=gen)
    timesteps = torch.tensor([17, 803])
    time_ids = torch.tensor([[96.0, 128.0, 0.0, 16.0, 64.0, 64.0], [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    out1 = te1(input_ids, output_hidden_states=True)
    out2 = te2(input_ids, output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    cond = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    noisy = sched.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=cond).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()

    io = {"input_ids": input_ids.to(torch.int64), "latents": latents, "noise": noise,
          "timesteps": timesteps.float(), "time_ids": time_ids}
    grad_norm = step_and_record(params, loss, io, "sdxl_step")
    n_te = sum(k.startswith("lora_te") for k in params) // 2
    frozen = sum(p.grad is None for p in params.values())
    print(f"loss {loss.item():.6f}, grad norm {grad_norm.item():.6f}, {len(params) // 2} modules ({n_te} te), "
          f"{frozen} tensors without gradient")


if __name__ == "__main__":
    main()
