"""PyTorch side of `cargo bench -p easyphoto-lora --bench merge`: the same merge
(`W += m · alpha/rank · up @ down`, rank 128, the 192 UNet + 72 text-encoder targets of
EasyPhoto) into the full-size SD1.5 UNet and CLIP-L, random float32 weights, f16 LoRA tensors
upcast; one warm-up, median of the timed runs.

  OMP_NUM_THREADS=2 .venv-ref/bin/python tools/reference/lora_bench_merge.py --threads 2 --runs 3
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

CONFIGS = Path(__file__).resolve().parents[2] / "tools" / "bench" / "configs"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd15_unet.json").read_text()))
    te = CLIPTextModel(CLIPTextConfig(**json.loads((CONFIGS / "clip_l.json").read_text())))
    layers = []
    for model, unet_like in ((unet, True), (te, False)):
        for name, m in model.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if (unet_like and ".attentions." in name) or (not unet_like and (".self_attn." in name or ".mlp." in name)):
                w = m.weight.data
                down = (0.01 * torch.randn(128, w[0].numel())).half()
                up = (0.01 * torch.randn(w.shape[0], 128)).half()
                layers.append((w, down, up))
    assert len(layers) == 264, len(layers)

    def merge() -> None:
        with torch.no_grad():
            for w, down, up in layers:
                w.view(w.shape[0], -1).addmm_(up.float(), down.float(), alpha=0.9 * 64 / 128)

    merge()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        merge()
        times.append(time.perf_counter() - start)
    print(json.dumps({"bench": "merge_rank128_sd15", "impl": f"torch {torch.__version__}", "modules": len(layers),
                      "threads": torch.get_num_threads(), "merge_median_s": round(statistics.median(times), 4),
                      "times_s": [round(t, 3) for t in times]}))


if __name__ == "__main__":
    main()
