"""Mask morphology, box blur and compositing as EasyPhoto runs them in OpenCV/numpy, on real masks:
writes crates/face/tests/fixtures/morphology.safetensors.

Masks:
* `person`: the person mask of astronaut.png (160x160 around its outline) from the MediaPipe selfie segmenter
  (`crates/face/assets/human/human_selfie.onnx`, 256x256, probability > 0.5 -> 255);
* `box`: EasyPhoto's box mask (255 inside a safe box that touches the image border), 100x120.

Operations (OpenCV 5.0.0; EasyPhoto's calls in scripts/easyphoto_infer.py): cv2.dilate / cv2.erode
with np.ones kernels (8, 16, an empty kernel, a 5x3 rectangle), morphologyEx CLOSE (7, 12),
the fusion mask chain erode16(dilate8(m)), cv2.blur on uint8 (8, 32, 5x3) and on float32 (32),
and the multi-person paste-back composite through blur32(box)/255 with float32 weights.

    .venv-ref/bin/python tools/reference/face_image_morphology.py
"""

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/face/tests/fixtures/morphology.safetensors"
SELFIE = ROOT / "crates/face/assets/human/human_selfie.onnx"


def person_mask():
    img = Image.open(ROOT / "crates/face/tests/assets/astronaut.png").convert("RGB").resize((256, 256), Image.BILINEAR)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(SELFIE), opts, providers=["CPUExecutionProvider"])
    x = (np.asarray(img, np.float32) / 255.0)[None]
    prob = sess.run(None, {sess.get_inputs()[0].name: x})[0][0, :, :, 0]
    return np.ascontiguousarray(np.uint8(prob > 0.5)[40:200, 48:208] * 255)  # 160x160 around the outline


def main():
    t = {}
    person = person_mask()
    box = np.zeros((100, 120), np.uint8)
    box[0:67, 71:120] = 255
    for name, m in [("person", person), ("box", box)]:
        t[f"{name}.mask"] = m
        for k in (8, 16):
            t[f"{name}.dilate{k}"] = cv2.dilate(m, np.ones((k, k), np.uint8), iterations=1)
            t[f"{name}.erode{k}"] = cv2.erode(m, np.ones((k, k), np.uint8), iterations=1)
        t[f"{name}.dilate0"] = cv2.dilate(m, np.ones((0, 0), np.uint8), iterations=1)
        t[f"{name}.dilate5x3"] = cv2.dilate(m, np.ones((3, 5), np.uint8), iterations=1)
        t[f"{name}.erode5x3"] = cv2.erode(m, np.ones((3, 5), np.uint8), iterations=1)
        for k in (7, 12):
            t[f"{name}.close{k}"] = cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
        t[f"{name}.fusion_chain"] = cv2.erode(cv2.dilate(m, np.ones((8, 8), np.uint8), iterations=1), np.ones((16, 16), np.uint8), iterations=1)
        for k in (8, 32):
            t[f"{name}.blur_u8_{k}"] = cv2.blur(m, (k, k))
        t[f"{name}.blur_f32_32"] = cv2.blur(np.float32(m), (32, 32))
        t[f"{name}.blur_u8_5x3"] = cv2.blur(m, (5, 3))

    # Multi-person paste-back (easyphoto_infer.py): blur32 of the safe-box mask, /255 in float32.
    astronaut = np.array(Image.open(ROOT / "crates/face/tests/assets/astronaut.png").convert("RGB"))
    fg = astronaut[100:200, 150:270]
    bg = np.ascontiguousarray(astronaut[300:400, 50:170][:, ::-1])
    weights = cv2.blur(np.float32(box), (32, 32)) / 255
    t["paste.fg"] = fg
    t["paste.bg"] = bg
    t["paste.out"] = np.uint8(np.float32(fg) * weights[..., None] + np.float32(bg) * (1 - weights[..., None]))
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(t.items())}, OUT)


if __name__ == "__main__":
    main()
