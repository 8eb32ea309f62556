"""Python side of crates/pipeline/examples/bench_sha256.rs: hashlib (OpenSSL) sha256 of one file,
read in the same 256 KiB chunks. Prints one JSON line. Usage: sha256.py FILE [RUNS]"""
import hashlib
import json
import os
import sys
import time

path = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
size = os.path.getsize(path)
times = []
for _ in range(runs):
    start = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 18):
            h.update(chunk)
    digest = h.hexdigest()
    times.append(time.perf_counter() - start)
times.sort()
median = times[len(times) // 2]
print(json.dumps({"impl": "python hashlib", "bytes": size, "median_s": round(median, 4),
                  "mb_per_s": round(size / median / 1e6, 1), "sha256": digest}))
