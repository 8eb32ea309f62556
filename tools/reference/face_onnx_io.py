#!/usr/bin/env python3
"""Reference input and outputs of MediaPipe BlazeFace (short range) for easyphoto-face's runtime test.

Preprocesses astronaut.png exactly as `easyphoto_face::to_nchw_signed` does (image-rs's Triangle
resize, reimplemented below in float32 numpy; RGB scaled to [-1, 1]; NCHW), runs Python
onnxruntime on it, and writes `input`, `regressors` and `classificators` to a safetensors file.

    python tools/reference/face_onnx_io.py   # from the repository root; writes the crate fixture
"""

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
CRATE = ROOT / "crates" / "face" / "tests"
F32 = np.float32


def triangle_weights(src: int, dst: int) -> list[tuple[int, np.ndarray]]:
    """Per output pixel: (first source index, normalised float32 weights), as image-rs 0.25 computes them."""
    ratio = F32(src) / F32(dst)
    sratio = max(ratio, F32(1.0))
    support = F32(1.0) * sratio
    out = []
    for o in range(dst):
        centre = (F32(o) + F32(0.5)) * ratio
        left = min(max(int(np.floor(centre - support)), 0), src - 1)
        right = min(max(int(np.ceil(centre + support)), left + 1), src)
        centre = centre - F32(0.5)
        ws = []
        for i in range(left, right):
            d = abs((F32(i) - centre) / sratio)
            ws.append(F32(1.0) - d if d < F32(1.0) else F32(0.0))
        total = F32(0.0)
        for w in ws:  # sequential float32 sum, in Rust's order
            total = F32(total + w)
        out.append((left, np.array([w / total for w in ws], dtype=F32)))
    return out


def resize_triangle(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """image::imageops::resize(.., FilterType::Triangle) on an HxWx3 uint8 array, bit-exact."""
    src = img.astype(F32)
    tmp = np.empty((height, img.shape[1], 3), F32)  # vertical pass, kept in float32
    for y, (top, ws) in enumerate(triangle_weights(img.shape[0], height)):
        acc = np.zeros((img.shape[1], 3), F32)
        for k, w in enumerate(ws):
            acc += src[top + k] * w
        tmp[y] = acc
    out = np.empty((height, width, 3), F32)  # horizontal pass, then round half away from zero
    for x, (left, ws) in enumerate(triangle_weights(img.shape[1], width)):
        acc = np.zeros((height, 3), F32)
        for k, w in enumerate(ws):
            acc += tmp[:, left + k] * w
        out[:, x] = acc
    out = np.clip(out, F32(0.0), F32(255.0))
    floor = np.floor(out)
    return np.where(out - floor >= F32(0.5), floor + 1, floor).astype(np.uint8)


def preprocess(path: Path, size: int) -> np.ndarray:
    """[1, 3, size, size] float32 RGB in [-1, 1]."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    small = resize_triangle(rgb, size, size).astype(F32)
    return np.ascontiguousarray((small / F32(127.5) - F32(1.0)).transpose(2, 0, 1)[None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=CRATE.parent / "assets" / "mediapipe" / "face_detection_short_range.onnx")
    parser.add_argument("--image", type=Path, default=CRATE / "assets" / "astronaut.png")
    parser.add_argument("--out", type=Path, default=CRATE / "fixtures" / "blazeface_short_io.safetensors")
    args = parser.parse_args()

    x = preprocess(args.image, 128)
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    regressors, classificators = session.run(["regressors", "classificators"], {"input": x})
    assert regressors.shape == (1, 896, 16) and classificators.shape == (1, 896, 1)

    best = int(classificators[0, :, 0].argmax())
    score = 1.0 / (1.0 + np.exp(-float(classificators[0, best, 0])))
    print(f"onnxruntime {ort.__version__}: best anchor {best}, score {score:.4f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"input": x, "regressors": regressors, "classificators": classificators}
    metadata = {"generator": "tools/reference/face_onnx_io.py", "onnxruntime": ort.__version__}
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
