#!/usr/bin/env bash
# Times easyphoto-rs and PyTorch/diffusers on the same full-size configs, same machine, same thread
# count, one after the other in each round so both see the same load; prints one JSON line per run.
# Usage: tools/bench/compare.sh [unet|vae-decode|clip-l ...]   (env: THREADS=2 RUNS=3 ROUNDS=1)
# Needs the reference venv (.venv-ref, see tools/reference/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
ROUNDS=${ROUNDS:-1}
models=("${@:-unet vae-decode clip-l}")
cargo build --release --example bench_sd15 -q
for round in $(seq "$ROUNDS"); do
    for model in ${models[@]}; do
        echo "# round $round, $model" >&2
        RAYON_NUM_THREADS=$THREADS target/release/examples/bench_sd15 "$model" --runs "$RUNS" | sed "s/^{/{\"model\": \"$model\", /"
        OMP_NUM_THREADS=$THREADS .venv-ref/bin/python tools/bench/sd15_torch.py "$model" --runs "$RUNS" --threads "$THREADS" | sed "s/^{/{\"model\": \"$model\", /"
    done
done
