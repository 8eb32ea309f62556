"""OpenCV 8-bit L*a*b* conversions and EasyPhoto's colour shift on real photos: writes
crates/face/tests/fixtures/color.safetensors.

* `cube.lab`: cv2.cvtColor(RGB2LAB) of every RGB triple with components in 0, 7, ..., 252, 255
  (38^3 colours, r slowest); `cube.rgb`: cv2.cvtColor(LAB2RGB) of the same triples read as L*a*b*.
* `src`/`ref`: 160x128 crops of astronaut.png (face) and faceapi_sample1.jpg (a face in another
  light); `src.lab`, `src.back` (LAB2RGB of src.lab), `transfer` = EasyPhoto's
  `color_transfer(src, ref)` (scripts/easyphoto_utils/face_process_utils.py, copied in spirit
  below), `mask` = a filled face ellipse (0/255), `shift` = EasyPhoto's colour shift composite
  `transfer * m + src * (1 - m)` with `m = cv2.blur(float32(mask), (32, 32)) / 255`, assigned into
  a uint8 array.

    .venv-ref/bin/python tools/reference/face_image_color.py
"""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/face/tests/fixtures/color.safetensors"


def color_transfer(sc, dc):
    """EasyPhoto's color_transfer, step by step."""

    def get_mean_and_std(img):
        x_mean, x_std = cv2.meanStdDev(img)
        x_mean = np.hstack(np.around(x_mean, 2))
        x_std = np.hstack(np.around(x_std, 2))
        return x_mean, x_std

    sc = cv2.cvtColor(sc, cv2.COLOR_RGB2LAB)
    s_mean, s_std = get_mean_and_std(sc)
    dc = cv2.cvtColor(dc, cv2.COLOR_RGB2LAB)
    t_mean, t_std = get_mean_and_std(dc)
    img_n = ((sc - s_mean) * (t_std / s_std)) + t_mean
    np.putmask(img_n, img_n > 255, 255)
    np.putmask(img_n, img_n < 0, 0)
    return cv2.cvtColor(cv2.convertScaleAbs(img_n), cv2.COLOR_LAB2RGB)


def main():
    t = {}
    levels = np.array(list(range(0, 253, 7)) + [255], np.uint8)
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    cube = np.stack([r, g, b], -1).reshape(1, -1, 3)
    t["cube.lab"] = cv2.cvtColor(cube, cv2.COLOR_RGB2LAB)[0]
    t["cube.rgb"] = cv2.cvtColor(cube, cv2.COLOR_LAB2RGB)[0]

    astronaut = np.array(Image.open(ROOT / "crates/face/tests/assets/astronaut.png").convert("RGB"))
    group = np.array(Image.open(ROOT / "crates/face/tests/assets/faceapi_sample1.jpg").convert("RGB"))
    src = np.ascontiguousarray(astronaut[40:200, 170:298])
    ref = np.ascontiguousarray(group[60:220, 60:188])
    t["src"], t["ref"] = src, ref
    t["src.lab"] = cv2.cvtColor(src, cv2.COLOR_RGB2LAB)
    t["src.back"] = cv2.cvtColor(t["src.lab"], cv2.COLOR_LAB2RGB)
    transfer = color_transfer(src.copy(), ref)
    t["transfer"] = transfer
    mask = np.zeros(src.shape[:2], np.uint8)
    cv2.ellipse(mask, (64, 85), (40, 55), 0, 0, 360, 255, -1)
    t["mask"] = mask
    m = cv2.blur(np.float32(mask), (32, 32)) / 255
    shifted = src.copy()
    shifted[:, :, :] = transfer * m[..., None] + src * (1 - m[..., None])
    t["shift"] = shifted
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(t.items())}, OUT)


if __name__ == "__main__":
    main()
