#!/usr/bin/env python3
"""Segmenter and PIL-resize fixtures for easyphoto-face (`crates/face/tests/segment.rs`).

Writes `crates/face/tests/assets/u2net_random.onnx`, a seeded random model with U²-Net's
signature (input `input.1` [1, 3, 320, 320]; seven sigmoid outputs [1, 1, 320, 320], the first
being the saliency map), runs rembg 2.0.86's `U2netSession.predict` with it (PIL LANCZOS to 320²,
`/ max`, ImageNet mean/std, min-max normalisation, `uint8` truncation, LANCZOS back) on
astronaut.png and faceapi_sample1_640.png, and stores the masks, plus PIL LANCZOS and BILINEAR resizes of
astronaut.png (RGB and L, reduction and enlargement), in `tests/fixtures/segment.safetensors`.

    .venv-ref/bin/python tools/reference/face_segment.py
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from safetensors.numpy import save_file


def rembg_u2net_session():
    """rembg's `U2netSession` class, imported without the package `__init__` (which needs
    pymatting for matting we do not use; pooch, for downloads, is stubbed)."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("rembg")
    pkg_dir = Path(spec.submodule_search_locations[0])
    for name, sub in (("rembg", pkg_dir), ("rembg.sessions", pkg_dir / "sessions")):
        module = types.ModuleType(name)
        module.__path__ = [str(sub)]
        sys.modules[name] = module
    sys.modules.setdefault("pooch", types.ModuleType("pooch"))  # only used for downloads
    from rembg.sessions.u2net import U2netSession

    return U2netSession

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "crates" / "face" / "tests" / "assets"
OUT = ROOT / "crates" / "face" / "tests" / "fixtures" / "segment.safetensors"


def u2net_model() -> onnx.ModelProto:
    rng = np.random.default_rng(4321)
    nodes, inits = [], []

    def conv(x, cin, cout, k, name):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], pads=[k // 2] * 4))
        return name

    x = conv("input.1", 3, 8, 3, "c1")
    nodes.append(helper.make_node("Relu", [x], ["r1"]))
    x = conv("r1", 8, 8, 3, "c2")
    nodes.append(helper.make_node("Relu", [x], ["r2"]))
    names = [str(n) for n in range(1959, 1966)]
    for i, name in enumerate(names):
        nodes.append(helper.make_node("Sigmoid", [conv("r2", 8, 1, 1, f"side{i}")], [name]))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 320, 320]) for n in names]
    graph = helper.make_graph(nodes, "u2net_random", [inp], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def main() -> None:
    path = ASSETS / "u2net_random.onnx"
    model = u2net_model()
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    u2net_session = rembg_u2net_session()
    session = u2net_session.__new__(u2net_session)  # rembg's session, with our model instead of a download
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session.inner_session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = {}
    for name in ("astronaut.png", "faceapi_sample1_640.png"):
        img = Image.open(ASSETS / name).convert("RGB")
        key = Path(name).stem.removesuffix("_640")
        out[f"{key}.u2net_mask"] = np.asarray(session.predict(img)[0])
    astro = Image.open(ASSETS / "astronaut.png").convert("RGB")
    out["pil.lanczos_rgb_320"] = np.asarray(astro.resize((320, 320), Image.Resampling.LANCZOS))
    crop = astro.crop((150, 100, 250, 180))  # 100 x 80
    out["pil.lanczos_rgb_up_170x130"] = np.asarray(crop.resize((170, 130), Image.Resampling.LANCZOS))
    out["pil.bilinear_rgb_up_170x130"] = np.asarray(crop.resize((170, 130), Image.Resampling.BILINEAR))
    out["pil.bilinear_rgb_200x150"] = np.asarray(astro.resize((200, 150), Image.Resampling.BILINEAR))
    out["pil.lanczos_l_97x131"] = np.asarray(astro.convert("L").resize((97, 131), Image.Resampling.LANCZOS))
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(out.items())}, str(OUT))
    for k, v in sorted(out.items()):
        print(k, v.shape, v.dtype, v.min(), v.max())


if __name__ == "__main__":
    main()
