#!/usr/bin/env bash
# sha256 throughput of `easyphoto models verify` against Python's hashlib (OpenSSL), same file,
# one after the other in each round. Usage: tools/bench/sha256_compare.sh [MiB] (env: RUNS=5 ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
MIB=${1:-512}
RUNS=${RUNS:-5}
ROUNDS=${ROUNDS:-3}
file=$(mktemp)
trap 'rm -f "$file"' EXIT
head -c $((MIB * 1024 * 1024)) /dev/urandom > "$file"
cargo build --release -p easyphoto-pipeline --example bench_sha256 -q
for round in $(seq "$ROUNDS"); do
    target/release/examples/bench_sha256 "$file" "$RUNS"
    python3 tools/bench/sha256.py "$file" "$RUNS"
done
