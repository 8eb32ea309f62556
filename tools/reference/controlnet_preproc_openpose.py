"""Fixtures of the openpose preprocessor of crates/controlnet: skeleton rendering (controlnet_aux
draw_bodypose with cv2.ellipse2Poly / fillConvexPoly / circle), the body network on formula weights,
and the heat-map/PAF decoding of controlnet_aux's Body on synthesised maps.

Writes crates/controlnet/tests/fixtures/openpose/:

- ellipse2poly.json     random (center, axes, angle) and cv2.ellipse2Poly's polygon
- draw_bodypose.json    canvases and bodies (OpenPose-18, normalised, null = missing)
- draw_bodypose_<i>.png the rendered canvases
- body_model_io.safetensors  `input` [1, 3, 24, 24] and controlnet_aux bodypose_model's `paf`
                             [1, 38, 3, 3] / `heat` [1, 19, 3, 3] with the formula weights below
- body_model_partial.pth     a zip .pth holding only conv1_1.{weight,bias} (missing-key test)

The body network's 52M weights are not stored: both sides compute them from an integer hash
(splitmix64-style, `formula_weights`), element i of the t-th key in sorted order:
x = (i+1)*0x9E3779B97F4A7C15 + (t+1)*0xBF58476D1CE4E5B9; x ^= x>>31; x *= 0x94D049BB133111EB;
x ^= x>>29; u = (x>>40) / 2^24; value = f32((2u-1) * s), s = sqrt(6 / fan_in) for weights and 0.1
for biases.

    .venv-ref/bin/python tools/reference/controlnet_preproc_openpose.py
"""

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

cv2.setNumThreads(1)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/controlnet/tests/fixtures/openpose"


def save_png(name, array):
    Image.fromarray(array).save(OUT / name, optimize=False, compress_level=9)


def save_json(name, value):
    (OUT / name).write_text(json.dumps(value, indent=None, separators=(",", ":")) + "\n")


def ellipse_cases(rng):
    cases = []
    for _ in range(40):
        center = [int(rng.integers(-20, 300)), int(rng.integers(-20, 300))]
        axes = [int(rng.integers(0, 200)), int(rng.integers(0, 8))]
        angle = int(rng.integers(-400, 400))
        poly = cv2.ellipse2Poly(tuple(center), tuple(axes), angle, 0, 360, 1)
        cases.append({"center": center, "axes": axes, "angle": angle, "polygon": poly.tolist()})
    return cases


def random_body(rng, margin):
    body = []
    for _ in range(18):
        if rng.random() < 0.15:
            body.append(None)
        else:
            body.append([float(rng.uniform(-margin, 1 + margin)), float(rng.uniform(-margin, 1 + margin))])
    return body


def standing_body():
    # A plausible frontal person (x, y normalised), every part present.
    return [
        [0.50, 0.18], [0.50, 0.30], [0.38, 0.30], [0.33, 0.45], [0.31, 0.60], [0.62, 0.30], [0.67, 0.45],
        [0.69, 0.60], [0.42, 0.60], [0.41, 0.78], [0.40, 0.95], [0.58, 0.60], [0.59, 0.78], [0.60, 0.95],
        [0.47, 0.16], [0.53, 0.16], [0.44, 0.18], [0.56, 0.18],
    ]


def draw_cases(rng):
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.util import draw_bodypose

    canvases = [
        (512, 512, [standing_body()]),
        (384, 256, [random_body(rng, 0.0), random_body(rng, 0.0)]),
        (200, 300, [random_body(rng, 0.1), random_body(rng, 0.1), random_body(rng, 0.1)]),
        (97, 131, [random_body(rng, 0.3)]),
    ]
    cases = []
    for i, (w, h, bodies) in enumerate(canvases):
        canvas = np.zeros((h, w, 3), np.uint8)
        for body in bodies:
            keypoints = [None if k is None else Keypoint(x=k[0], y=k[1]) for k in body]
            canvas = draw_bodypose(canvas, keypoints)
        save_png(f"draw_bodypose_{i}.png", canvas)
        cases.append({"width": w, "height": h, "bodies": bodies, "image": f"draw_bodypose_{i}.png"})
    return cases


def formula_weights(shapes):
    out = {}
    with np.errstate(over="ignore"):
        for t, key in enumerate(sorted(shapes)):
            shape = shapes[key]
            i = np.arange(int(np.prod(shape)), dtype=np.uint64)
            x = (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(t + 1) * np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(31)
            x *= np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(29)
            u = (x >> np.uint64(40)).astype(np.float64) / float(1 << 24)
            scale = np.sqrt(6.0 / float(np.prod(shape[1:]))) if key.endswith(".weight") else 0.1
            out[key] = ((2.0 * u - 1.0) * scale).astype(np.float32).reshape(shape)
    return out


def body_model_fixture():
    import torch
    from safetensors.torch import save_file
    from controlnet_aux.open_pose import util
    from controlnet_aux.open_pose.model import bodypose_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = bodypose_model().eval()
    # The original checkpoint's keys: the model's without their first component (util.transfer).
    shapes = {".".join(k.split(".")[1:]): tuple(v.shape) for k, v in model.state_dict().items()}
    original = {k: torch.from_numpy(v) for k, v in formula_weights(shapes).items()}
    model.load_state_dict(util.transfer(model, original))
    image = torch.rand(1, 3, 24, 24) - 0.5
    with torch.no_grad():
        paf, heat = model(image)
    print("body model: |paf| max", paf.abs().max().item(), "|heat| max", heat.abs().max().item())
    save_file({"input": image.contiguous(), "paf": paf.contiguous(), "heat": heat.contiguous()},
              OUT / "body_model_io.safetensors")
    partial = {k: original[k].clone() for k in ["conv1_1.weight", "conv1_1.bias"]}
    torch.save(partial, OUT / "body_model_partial.pth")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240607)
    save_json("ellipse2poly.json", ellipse_cases(rng))
    save_json("draw_bodypose.json", draw_cases(rng))
    body_model_fixture()


if __name__ == "__main__":
    main()
