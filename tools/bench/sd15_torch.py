"""PyTorch/diffusers side of tools/bench/compare.sh: the same configs, inputs shapes, thread count
and reporting as examples/bench_sd15.rs (random weights, one warm-up run, median of the timed runs,
peak RSS)."""
import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

CONFIGS = Path(__file__).parent / "configs"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["unet", "vae-decode", "clip-l"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rss_before = peak_rss_mib()
    with torch.inference_mode():
        if args.model == "unet":
            model = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd15_unet.json").read_text())).eval()
            sample, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
            t = torch.tensor([999.0, 999.0])
            run = lambda: model(sample, t, context).sample  # noqa: E731
        elif args.model == "clip-l":
            # The WebUI encodes a 150-token prompt as two 77-token chunks, one forward each.
            config = CLIPTextConfig(**json.loads((CONFIGS / "clip_l.json").read_text()))
            model = CLIPTextModel(config).eval()
            chunks = [torch.randint(0, 49406, (1, 77)) for _ in range(2)]
            run = lambda: torch.cat([model(ids).last_hidden_state for ids in chunks], 1)  # noqa: E731
        else:
            model = AutoencoderKL.from_config(json.loads((CONFIGS / "sd15_vae.json").read_text())).eval()
            latents = torch.randn(1, 4, 64, 64)
            run = lambda: model.decode(latents).sample  # noqa: E731
        weights = peak_rss_mib() - rss_before
        run()
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "impl": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "median_s": round(statistics.median(times), 3),
        "times_s": [round(t, 3) for t in times],
        "peak_rss_mib": round(peak_rss_mib()),
        "weights_mib": round(weights),
    }))


if __name__ == "__main__":
    main()
