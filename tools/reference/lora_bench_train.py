"""PyTorch + peft side of `cargo bench -p easyphoto-lora --bench train_step`: one LoRA training
step (forward + backward + clip_grad_norm_ + AdamW) at batch 1 on the mid-size UNet of
crates/lora/benches/mid_unet.json, EasyPhoto's rank 128 / alpha 64 on every Linear/Conv2d of the
transformer blocks, random weights, float32; one warm-up step, median of the timed steps (wall and
CPU time), peak RSS.

  OMP_NUM_THREADS=2 .venv-ref/bin/python tools/reference/lora_bench_train.py --threads 2 --runs 5

`--config path/to/config.json` takes another UNet, with latents of its `sample_size` (as the
Rust bench's `UNET_CONFIG`).
"""

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model

CONFIG = Path(__file__).resolve().parents[2] / "crates" / "lora" / "benches" / "mid_unet.json"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = json.loads(args.config.read_text())
    unet = UNet2DConditionModel.from_config(config)
    side = config["sample_size"]
    weights = peak_rss_mib()
    unet.requires_grad_(False)
    targets = sorted(
        n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".attentions." in n
    )
    inject_adapter_in_model(LoraConfig(r=128, lora_alpha=64, target_modules=targets), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    latents, noise = torch.randn(1, 4, side, side), torch.randn(1, 4, side, side)
    hidden, t = torch.randn(1, 77, 768), torch.tensor([500])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        pred = unet(sched.add_noise(latents, noise, t), t, hidden).sample
        F.mse_loss(pred.float(), noise.float(), reduction="mean").backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()
    times, cpu = [], []
    for _ in range(args.runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    print(json.dumps({
        "bench": f"lora_train_step_{args.config.stem}_b1",
        "impl": f"torch {torch.__version__} + peft",
        "modules": len(targets),
        "threads": torch.get_num_threads(),
        "median_s": round(statistics.median(times), 3),
        "cpu_median_s": round(statistics.median(cpu), 2),
        "times_s": [round(x, 3) for x in times],
        "peak_rss_mib": round(peak_rss_mib()),
        "weights_mib": round(weights),
    }))


if __name__ == "__main__":
    main()
