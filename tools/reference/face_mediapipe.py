#!/usr/bin/env python3
"""MediaPipe BlazeFace (short range) and FaceMesh reference for easyphoto-face
(`crates/face/tests/mediapipe.rs`), written from MediaPipe's graph options and calculators, not
from the crate:

* anchors: `SsdAnchorsCalculator` with the options of `face_detection_short_range.pbtxt`
  (4 layers, strides 8/16/16/16, min scale 0.1484375, max scale 0.75, aspect ratio 1 plus the
  interpolated one, offset 0.5, fixed anchor size);
* decoding: `TensorsToDetectionsCalculator` (reverse output order, x/y/w/h scales 128, six
  keypoints, sigmoid scores with clipping at 100, min score 0.5, boxes of negative size dropped);
* `NonMaxSuppressionCalculator` WEIGHTED at IoU 0.3 (the top detection keeps its score, its box
  and keypoints become the score-weighted means of its cluster);
* letterbox removal back to image pixels;
* FaceMesh: the ROI of `DetectionsToRectsCalculator` (rotation from keypoint 0 to keypoint 1) and
  `RectTransformationCalculator` (square on the long side, scale 1.5), the 192² crop as the image
  of that rotated rectangle (`cv2.warpAffine`, bilinear, black border), and
  `LandmarkProjectionCalculator` back into the image.

The square canvas (image at floor((side - w) / 2), black bars) and its 128² resize (image-rs's
Triangle filter, `face_onnx_io.resize_triangle`) are the crate's preprocessing: MediaPipe's own
GPU/OpenCV resampling cannot be reproduced, so both sides share the input pixels and everything
after them is checked. float32 throughout, as MediaPipe computes.

    .venv-ref/bin/python tools/reference/face_mediapipe.py
"""

import math
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image
from safetensors.numpy import save_file

from face_onnx_io import resize_triangle

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "crates" / "face" / "tests" / "assets"
MODELS = ROOT / "crates" / "face" / "assets" / "mediapipe"
OUT = ROOT / "crates" / "face" / "tests" / "fixtures" / "mediapipe.safetensors"
F32 = np.float32

# (key, photo, crop (x, y, w, h) or None): whole photos and EasyPhoto-style crops around faces.
CASES = [
    ("astronaut", "astronaut.png", None),
    ("camera", "camera.png", None),
    ("sample1_left", "faceapi_sample1_640.png", (90, 60, 170, 200)),
    ("sample1_middle", "faceapi_sample1_640.png", (230, 90, 170, 190)),
    ("sample3_right", "faceapi_sample3_640.png", (450, 40, 170, 210)),
    ("sample4_wide", "faceapi_sample4_640.png", (60, 0, 460, 260)),
]


def ssd_anchors():
    """SsdAnchorsCalculator for the short-range model: [N, 2] centres (fixed size: w = h = 1)."""
    num_layers, strides, size = 4, [8, 16, 16, 16], 128
    min_scale, max_scale = 0.1484375, 0.75

    def scale(i):
        return min_scale + (max_scale - min_scale) * i / (num_layers - 1)

    anchors = []
    layer = 0
    while layer < num_layers:
        per_cell = 0
        last = layer
        while last < num_layers and strides[last] == strides[layer]:
            _ = scale(last)  # fixed anchor size: the scales only set the number of anchors
            per_cell += 2  # aspect ratio 1.0, and the interpolated scale (aspect 1.0)
            last += 1
        grid = math.ceil(size / strides[layer])
        for y in range(grid):
            for x in range(grid):
                for _ in range(per_cell):
                    anchors.append(((x + 0.5) / grid, (y + 0.5) / grid))
        layer = last
    return np.asarray(anchors, dtype=F32)


def decode(reg, cls, anchors):
    """TensorsToDetectionsCalculator: detections as (score, [xmin, ymin, xmax, ymax], keypoints [6, 2])."""
    out = []
    s = F32(128.0)
    for i, (ax, ay) in enumerate(anchors):
        logit = np.clip(cls[i, 0], F32(-100.0), F32(100.0))
        with np.errstate(over="ignore"):  # exp(100) is inf in float32: score 0, as in C++
            score = F32(1.0) / (F32(1.0) + np.exp(-logit))
        if score < F32(0.5):
            continue
        r = reg[i]
        cx, cy = r[0] / s + ax, r[1] / s + ay  # anchor w = h = 1
        w, h = r[2] / s, r[3] / s
        box = np.array([cx - w / F32(2), cy - h / F32(2), cx + w / F32(2), cy + h / F32(2)], dtype=F32)
        if not (box[2] - box[0] >= 0 and box[3] - box[1] >= 0):
            continue
        kps = np.array([[r[4 + 2 * k] / s + ax, r[5 + 2 * k] / s + ay] for k in range(6)], dtype=F32)
        out.append((score, box, kps))
    return out


def iou(a, b):
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return F32(0.0)
    inter = F32(ix * iy)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else F32(0.0)


def weighted_nms(dets, threshold=0.3):
    """NonMaxSuppressionCalculator, algorithm WEIGHTED, overlap INTERSECTION_OVER_UNION."""
    remaining = sorted(dets, key=lambda d: -d[0])
    out = []
    while remaining:
        top = remaining[0]
        cluster = [d for d in remaining if iou(d[1], top[1]) > threshold]
        remaining = [d for d in remaining if not iou(d[1], top[1]) > threshold]
        total = F32(sum(F32(d[0]) for d in cluster))
        box = sum(d[1] * d[0] for d in cluster) / total
        kps = sum(d[2] * d[0] for d in cluster) / total
        out.append((top[0], box.astype(F32), kps.astype(F32)))
    return out


def blazeface(session, rgb):
    """Detections in image pixels: (score, box [4], keypoints [6, 2])."""
    h, w = rgb.shape[:2]
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    square = np.zeros((side, side, 3), np.uint8)
    square[oy:oy + h, ox:ox + w] = rgb
    x = resize_triangle(square, 128, 128).astype(F32) / F32(127.5) - F32(1.0)
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    reg, cls = session.run(["regressors", "classificators"], {"input": x})
    dets = weighted_nms(decode(reg[0], cls[0], ssd_anchors()))
    # Letterbox removal: normalised square coordinates to image pixels.
    scale, offset = F32(side), np.array([ox, oy], dtype=F32)
    return [(s, (b.reshape(2, 2) * scale - offset).reshape(4), k * scale - offset) for s, b, k in dets]


def mesh_roi(box, kps):
    """DetectionsToRects (rotation from keypoint 0 to 1) + RectTransformation (square long, 1.5×)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rotation = -math.atan2(-(kps[1][1] - kps[0][1]), kps[1][0] - kps[0][0])  # target angle 0
    rotation = rotation - 2 * math.pi * math.floor((rotation + math.pi) / (2 * math.pi))
    side = 1.5 * max(box[2] - box[0], box[3] - box[1])
    return float(cx), float(cy), float(side), rotation


def project(u, v, roi, size=192):
    """LandmarkProjectionCalculator on crop pixels (u, v): image pixels."""
    cx, cy, side, rot = roi
    x, y = u / size - 0.5, v / size - 0.5
    return (math.cos(rot) * x - math.sin(rot) * y) * side + cx, (math.sin(rot) * x + math.cos(rot) * y) * side + cy


def facemesh(session, rgb, box, kps):
    roi = mesh_roi(box, kps)
    corners = np.float32([[0, 0], [192, 0], [0, 192]])
    to_image = cv2.getAffineTransform(corners, np.float32([project(u, v, roi) for u, v in corners]))
    crop = cv2.warpAffine(rgb, to_image, (192, 192), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    x = np.ascontiguousarray((crop.astype(F32) / F32(127.5) - F32(1.0)).transpose(2, 0, 1)[None])
    pts, presence = session.run(["conv2d_20", "conv2d_30"], {"input_1": x})
    pts = pts.reshape(468, 3).astype(np.float64)
    xy = np.array([project(u, v, roi) for u, v, _ in pts])
    return np.concatenate([xy, pts[:, 2:]], axis=1), 1 / (1 + math.exp(-float(presence.ravel()[0])))


def main() -> None:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    det = ort.InferenceSession(str(MODELS / "face_detection_short_range.onnx"), opts, providers=["CPUExecutionProvider"])
    mesh = ort.InferenceSession(str(MODELS / "face_landmark.onnx"), opts, providers=["CPUExecutionProvider"])
    out = {}
    for key, name, crop in CASES:
        rgb = np.asarray(Image.open(ASSETS / name).convert("RGB"))
        if crop:
            x, y, w, h = crop
            rgb = np.ascontiguousarray(rgb[y:y + h, x:x + w])
        dets = blazeface(det, rgb)
        print(f"{key}: {len(dets)} detections, scores {[round(float(d[0]), 4) for d in dets]}")
        out[f"{key}.scores"] = np.array([d[0] for d in dets], dtype=F32)
        out[f"{key}.boxes"] = np.array([d[1] for d in dets], dtype=F32).reshape(-1, 4)
        out[f"{key}.keypoints"] = np.array([d[2] for d in dets], dtype=F32).reshape(-1, 6, 2)
        if dets:
            points, presence = facemesh(mesh, rgb, dets[0][1], dets[0][2])
            out[f"{key}.mesh"] = points.astype(np.float64)
            out[f"{key}.presence"] = np.array([presence], dtype=np.float64)
    save_file(out, OUT)


if __name__ == "__main__":
    main()
