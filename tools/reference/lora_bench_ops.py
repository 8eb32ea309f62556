"""PyTorch side of the LoRA-training op benches in `cargo bench -p easyphoto-diffusion --bench ops`
(`attention fwd+bwd` and `linear+lora fwd+bwd`): the same shapes, forward plus the backward of
`Σ w ⊙ out`, median of the timed runs in milliseconds.

  OMP_NUM_THREADS=2 .venv-ref/bin/python tools/reference/lora_bench_ops.py --threads 2
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(step, runs: int) -> float:
    times = []
    for i in range(runs + 3):
        start = time.perf_counter()
        step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for b, h, n, d in [(1, 8, 1024, 16), (1, 8, 4096, 40)]:
        q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
        w = torch.randn(b, h, n, d)

        def attention() -> None:
            (F.scaled_dot_product_attention(q, k, v) * w).sum().backward()
            q.grad = k.grad = v.grad = None

        results[f"attention fwd+bwd [{b},{h},{n},{d}]"] = median_ms(attention, max(3, args.runs // (n // 1024) ** 2))
    for rows, inp, out in [(1024, 128, 128), (1024, 128, 1024)]:
        x = (torch.randn(1, rows, inp) * 0.1).requires_grad_(True)
        down = (torch.randn(128, inp) * 0.1).requires_grad_(True)
        up = (torch.randn(out, 128) * 0.1).requires_grad_(True)
        weight, bias, w = torch.randn(out, inp), torch.randn(out), torch.randn(1, rows, out)

        def lora() -> None:
            y = F.linear(x, weight, bias) + 0.5 * F.linear(F.linear(x, down), up)
            (y * w).sum().backward()
            x.grad = down.grad = up.grad = None

        results[f"linear+lora fwd+bwd [{rows},{inp}]->{out}"] = median_ms(lora, args.runs)
    print(json.dumps({"impl": f"torch {torch.__version__}", "threads": torch.get_num_threads(), "median_ms": results}))


if __name__ == "__main__":
    main()
