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
- decode_maps.safetensors    heat maps [H, W, 19] and PAFs [H, W, 38] synthesised from known skeletons,
                             stored sparse (`heat_index`/`heat_value`, `paf_index`/`paf_value`: flat
                             indices and values of the non-zeros), plus `shape` = [H, W]
- estimate_io.safetensors    controlnet_aux Body(image) on a 256x128 crop of astronaut.png with the formula
                             weights: `image`, heat maps / PAFs at image size sampled every 8th pixel from
                             (3, 3) (`heat_samples` [32, 16, 19], `paf_samples` [32, 16, 38]), their
                             per-channel sums (`heat_sums`, `paf_sums`, f64), `candidate` and `subset`
- openpose_detector.png      controlnet_aux OpenposeDetector (body only, detect/image resolution 128)
                             on the same crop with the same network: the control image
- decode_expected.json       controlnet_aux Body's `candidate` and `subset` tables on those maps (its
                             network replaced by one returning the maps, its resizes by identities)

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


# The 19 scored limbs (0-based OpenPose parts) and their PAF channels, from controlnet_aux's
# limbSeq / mapIdx.
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13], [13, 14],
         [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
MAP_IDX = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24], [25, 26],
           [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38], [45, 46]]


def synthesise_maps(people, h, w, sigma=2.0, half_width=3.0):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    heat = np.zeros((h, w, 19), np.float32)
    paf = np.zeros((h, w, 38), np.float32)
    for person in people:
        for part, point in enumerate(person):
            if point is None:
                continue
            d2 = (xs - point[0]) ** 2 + (ys - point[1]) ** 2
            g = np.where(d2 <= (3 * sigma) ** 2, np.exp(-d2 / (2 * sigma * sigma)), 0.0).astype(np.float32)
            heat[:, :, part] = np.maximum(heat[:, :, part], g)
        for (a, b), (cx, cy) in zip(LIMBS, MAP_IDX):
            pa, pb = person[a - 1], person[b - 1]
            if pa is None or pb is None:
                continue
            vx, vy = pb[0] - pa[0], pb[1] - pa[1]
            norm = np.hypot(vx, vy)
            ux, uy = vx / norm, vy / norm
            along = (xs - pa[0]) * ux + (ys - pa[1]) * uy
            across = np.abs((xs - pa[0]) * uy - (ys - pa[1]) * ux)
            on = (along >= -half_width) & (along <= norm + half_width) & (across <= half_width)
            paf[:, :, cx - 19][on] = ux
            paf[:, :, cy - 19][on] = uy
    return heat, paf


def decode_fixture():
    import torch
    from safetensors.torch import save_file
    from controlnet_aux.open_pose import body as body_module
    from controlnet_aux.open_pose import util

    h, w = 128, 160
    rng = np.random.default_rng(7)

    def person(x0, y0, s):
        # A frontal skeleton of scale s around (x0, y0), with sub-pixel jitter.
        shape = [(0, -34), (0, -24), (-9, -24), (-12, -10), (-13, 3), (9, -24), (12, -10), (13, 3), (-5, 2),
                 (-6, 18), (-6, 33), (5, 2), (6, 18), (6, 33), (-3, -37), (3, -37), (-6, -35), (6, -35)]
        return [[x0 + dx * s + rng.uniform(-0.4, 0.4), y0 + dy * s + rng.uniform(-0.4, 0.4)] for dx, dy in shape]

    first = person(45, 64, 1.6)
    second = person(118, 66, 1.4)
    second[4] = None  # right wrist missing
    second[13] = None  # left ankle missing
    fragment = [None] * 18  # two parts only: dropped by the subset filter
    fragment[9], fragment[10] = [150.0, 110.0], [153.0, 122.0]
    people = [first, second, fragment]
    heat, paf = synthesise_maps(people, h, w)

    class FakeNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            to = lambda m: torch.from_numpy(np.ascontiguousarray(m.transpose(2, 0, 1)[None]))
            return to(paf), to(heat)

    originals = util.smart_resize, util.smart_resize_k
    util.smart_resize = lambda x, s: x
    util.smart_resize_k = lambda x, fx, fy: x
    try:
        estimator = body_module.Body.__new__(body_module.Body)
        estimator.model = FakeNetwork()
        candidate, subset = estimator(np.zeros((h, w, 3), np.uint8))
    finally:
        util.smart_resize, util.smart_resize_k = originals
    print("decode:", len(candidate), "candidates,", len(subset), "people")

    def sparse(m):
        flat = m.reshape(-1)
        index = np.nonzero(flat)[0]
        return torch.from_numpy(index.astype(np.int64)), torch.from_numpy(flat[index])

    heat_index, heat_value = sparse(heat)
    paf_index, paf_value = sparse(paf)
    save_file({"heat_index": heat_index, "heat_value": heat_value, "paf_index": paf_index, "paf_value": paf_value,
               "shape": torch.tensor([h, w], dtype=torch.int64)}, OUT / "decode_maps.safetensors")
    save_json("decode_expected.json", {"people": people, "candidate": np.asarray(candidate).tolist(),
                                       "subset": np.asarray(subset).tolist()})


def estimate_fixture():
    import sys
    import torch
    from safetensors.torch import save_file
    from controlnet_aux.open_pose import body as body_module
    from controlnet_aux.open_pose import util
    from controlnet_aux.open_pose.model import bodypose_model

    torch.set_num_threads(1)
    model = bodypose_model().eval()
    shapes = {".".join(k.split(".")[1:]): tuple(v.shape) for k, v in model.state_dict().items()}
    original = {k: torch.from_numpy(v) for k, v in formula_weights(shapes).items()}
    model.load_state_dict(util.transfer(model, original))
    estimator = body_module.Body.__new__(body_module.Body)
    estimator.model = model

    astronaut = np.array(Image.open(ROOT / "crates/controlnet/tests/assets/astronaut.png").convert("RGB"))
    image = np.ascontiguousarray(astronaut[40:296, 170:298])  # 256 x 128, RGB
    captured = {}

    def grab_locals(frame, event, arg):
        if event == "return" and frame.f_code is body_module.Body.__call__.__code__:
            captured.update(heat=frame.f_locals["heatmap_avg"], paf=frame.f_locals["paf_avg"])

    sys.setprofile(grab_locals)
    try:
        # OpenposeDetector.detect_poses hands Body the image as BGR.
        candidate, subset = estimator(image[:, :, ::-1].copy())
    finally:
        sys.setprofile(None)
    heat, paf = captured["heat"], captured["paf"]
    print("estimate:", len(candidate), "candidates,", len(subset), "people, |heat| max", np.abs(heat).max())
    tensors = {
        "image": torch.from_numpy(image),
        "heat_samples": torch.from_numpy(np.ascontiguousarray(heat[3::8, 3::8]).astype(np.float32)),
        "paf_samples": torch.from_numpy(np.ascontiguousarray(paf[3::8, 3::8]).astype(np.float32)),
        "heat_sums": torch.from_numpy(heat.sum(axis=(0, 1))),
        "paf_sums": torch.from_numpy(paf.sum(axis=(0, 1))),
        "candidate": torch.from_numpy(np.asarray(candidate, np.float64).reshape(-1, 4)),
        "subset": torch.from_numpy(np.asarray(subset, np.float64).reshape(-1, 20)),
    }
    save_file(tensors, OUT / "estimate_io.safetensors")

    from controlnet_aux.open_pose import OpenposeDetector

    detector = OpenposeDetector(estimator)
    picture = detector(image, detect_resolution=128, image_resolution=128, output_type="np")
    save_png("openpose_detector.png", picture)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240607)
    save_json("ellipse2poly.json", ellipse_cases(rng))
    save_json("draw_bodypose.json", draw_cases(rng))
    body_model_fixture()
    decode_fixture()
    estimate_fixture()


if __name__ == "__main__":
    main()
