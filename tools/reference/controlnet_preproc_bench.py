"""OpenCV's side of `cargo bench -p easyphoto-controlnet --bench preprocess`: the same operations on
the same 1024² crop of crates/controlnet/tests/assets/faceapi_sample1.jpg, one thread, median of
repeated runs.

    .venv-ref/bin/python tools/reference/controlnet_preproc_bench.py
"""

import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from controlnet_preproc_images import color_map

cv2.setNumThreads(1)
ROOT = Path(__file__).resolve().parents[2]


def median_ms(fn, repeat=50):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    image = np.array(Image.open(ROOT / "crates/controlnet/tests/assets/faceapi_sample1.jpg").convert("RGB"))
    h, w = image.shape[:2]
    rgb = np.ascontiguousarray(image[(h - 1024) // 2:(h - 1024) // 2 + 1024, (w - 1024) // 2:(w - 1024) // 2 + 1024])
    grey = np.array(Image.fromarray(rgb).convert("L"))
    print(f"canny 1024x1024 rgb: {median_ms(lambda: cv2.Canny(rgb, 100, 200)):.2f} ms")
    print(f"canny 1024x1024 grey: {median_ms(lambda: cv2.Canny(grey, 100, 200)):.2f} ms")
    print(f"resize cubic 1024->512 rgb: {median_ms(lambda: cv2.resize(rgb, (512, 512), interpolation=cv2.INTER_CUBIC)):.2f} ms")
    print(f"color_map 1024x1024 blur 24: {median_ms(lambda: color_map(rgb, 24), repeat=20):.2f} ms")


if __name__ == "__main__":
    main()
