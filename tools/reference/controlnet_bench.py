"""diffusers side of crates/controlnet/benches/controlnet_forward.rs: one full-size SD 1.5
ControlNet forward (random weights, batch 2, 64x64 latents, 77 tokens, 512^2 conditioning image),
one warm-up run, median of the timed runs, one JSON line.

Run: OMP_NUM_THREADS=2 .venv-ref/bin/python tools/reference/controlnet_bench.py --runs 3 --threads 2
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import ControlNetModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        model = ControlNetModel(cross_attention_dim=768).eval()  # lllyasviel/control_v11p_sd15_canny's config
        sample, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
        image = torch.rand(2, 3, 512, 512)
        t = torch.tensor([999.0, 999.0])
        run = lambda: model(sample, t, context, image, return_dict=False)  # noqa: E731
        run()
        times, cpu = [], []
        for _ in range(args.runs):
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    print(json.dumps({"impl": f"torch {torch.__version__}", "model": "controlnet-sd15", "threads": torch.get_num_threads(),
                      "median_s": round(statistics.median(times), 3), "times_s": [round(x, 3) for x in times],
                      "median_cpu_s": round(statistics.median(cpu), 2), "cpu_s": [round(x, 3) for x in cpu]}))


if __name__ == "__main__":
    main()
