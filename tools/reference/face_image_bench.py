"""OpenCV/numpy side of `cargo bench -p easyphoto-face --bench color_transfer`: the same 1024²
inputs (astronaut.png doubled by pixel repetition; reference = channels rotated G, B, R), median
of 20 runs after 3 warm-ups, with N OpenCV threads (default 1; the Rust side takes
RAYON_NUM_THREADS).

    (cd tools/reference && ../../.venv-ref/bin/python face_image_bench.py [N])
"""

import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from face_image_color import color_transfer

ROOT = Path(__file__).resolve().parents[2]


def median_ms(fn, runs=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main():
    cv2.setNumThreads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    photo = np.array(Image.open(ROOT / "crates/face/tests/assets/astronaut.png").convert("RGB"))
    src = np.ascontiguousarray(np.repeat(np.repeat(photo, 2, 0), 2, 1))
    ref = np.ascontiguousarray(src[:, :, [1, 2, 0]])
    lab = cv2.cvtColor(src, cv2.COLOR_RGB2LAB)
    mask = np.float32(((np.arange(1024)[:, None] // 128 + np.arange(1024)[None, :] // 128) % 2 == 0) * 255)
    print(f"opencv {cv2.__version__}, threads {cv2.getNumThreads()}")
    print(f"color_transfer (EasyPhoto: cv2 + numpy) 1024x1024: {median_ms(lambda: color_transfer(src, ref)):.2f} ms")
    print(f"cv2.cvtColor RGB2LAB 1024x1024: {median_ms(lambda: cv2.cvtColor(src, cv2.COLOR_RGB2LAB)):.2f} ms")
    print(f"cv2.cvtColor LAB2RGB 1024x1024: {median_ms(lambda: cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)):.2f} ms")
    print(f"cv2.blur float32 32x32 1024x1024: {median_ms(lambda: cv2.blur(mask, (32, 32))):.2f} ms")


if __name__ == "__main__":
    main()
