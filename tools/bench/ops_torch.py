"""PyTorch side of the single-op figures of issue 5: the SD-sized 3x3 convolution and the
4096-token attention, f32, on N threads; prints one JSON line per op (best and median of the
timed calls, after one warm-up call). Ours: `kernel_timing` (crates/diffusion/examples).

    OMP_NUM_THREADS=2 .venv-ref/bin/python tools/bench/ops_torch.py --threads 2
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def timed(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 320, 64, 64), torch.randn(320, 320, 3, 3) * 0.02, torch.randn(320)
    q, k, v = (torch.randn(2, 8, 4096, 40) for _ in range(3))
    cases = {
        "conv3x3 [2,320,64,64]->320": lambda: F.conv2d(x, w, b, padding=1),
        "attention self [2,8,4096,40] (SDPA)": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    with torch.inference_mode():
        for name, fn in cases.items():
            best, median = timed(fn, args.runs)
            print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "threads": args.threads, "op": name,
                              "best_ms": round(best * 1e3, 2), "median_ms": round(median * 1e3, 2)}))


if __name__ == "__main__":
    main()
