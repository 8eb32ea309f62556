"""Fixtures of the image preprocessors of crates/controlnet (canny, cv2.resize, colour map, tile).

Reads the photos committed in crates/controlnet/tests/assets and writes, with OpenCV on one thread,
PNG files to crates/controlnet/tests/fixtures/preprocess/:

- canny_<photo>.png            cv2.Canny(photo, 100, 200) (RGB photos as 3 channels, camera as grey)
  (faceapi1 is a JPEG: its canny agreement includes the decoders' differences)
- annotator_canny_<photo>.png  controlnet_aux CannyDetector (HWC3, resize_image to 512, Canny 100/200)
- webui_canny_<photo>.png      sd-webui-controlnet's canny preprocessor at 512 (resize_image_with_pad,
                               Canny 100/200, remove_pad; re-stated below, the WebUI is not on PyPI)
- resize_<photo>_<interp>_<w>x<h>.png  cv2.resize
- color_<photo>_r<blur_ratio>.png      EasyPhoto's colour-map chain (scripts/easyphoto_infer.py)
- tile_<photo>_r<rate>.png             sd-webui-controlnet tile_resample

    .venv-ref/bin/python tools/reference/controlnet_preproc_images.py
"""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

cv2.setNumThreads(1)

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "crates/controlnet/tests/assets"
OUT = ROOT / "crates/controlnet/tests/fixtures/preprocess"

INTER = {
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos4": cv2.INTER_LANCZOS4,
}


def load(name):
    return np.array(Image.open(ASSETS / name))


def save(name, array):
    # PNG through PIL with fixed settings: byte-stable.
    Image.fromarray(array).save(OUT / name, optimize=False, compress_level=9)


def resize_image(image, resolution):
    """EasyPhoto's / controlnet_aux's resize_image: short side to `resolution`, sides at multiples of 64."""
    h, w = image.shape[:2]
    k = float(resolution) / min(float(h), float(w))
    h = int(np.round(h * k / 64.0)) * 64
    w = int(np.round(w * k / 64.0)) * 64
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def webui_canny(image, resolution, low, high):
    """sd-webui-controlnet scripts/processor.py: canny(img, res, thr_a, thr_b) with resize_image_with_pad."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=2)  # HWC3
    h_raw, w_raw = image.shape[:2]
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h_target, w_target = int(np.round(float(h_raw) * k)), int(np.round(float(w_raw) * k))
    image = cv2.resize(image, (w_target, h_target), interpolation=interpolation)
    pad64 = lambda x: int(np.ceil(float(x) / 64.0) * 64 - x)
    padded = np.pad(image, [[0, pad64(h_target)], [0, pad64(w_target)], [0, 0]], mode="edge")
    return cv2.Canny(padded, low, high)[:h_target, :w_target]


def color_map(image, blur_ratio):
    """EasyPhoto get_controlnet_unit("color") image chain."""
    h, w = image.shape[:2]
    color = resize_image(np.array(image, np.uint8), 1024)
    now_h, now_w = color.shape[:2]
    color = cv2.resize(color, (int(now_w // blur_ratio), int(now_h // blur_ratio)), interpolation=cv2.INTER_CUBIC)
    color = cv2.resize(color, (now_w, now_h), interpolation=cv2.INTER_NEAREST)
    return cv2.resize(color, (w, h), interpolation=cv2.INTER_CUBIC)


def tile_resample(image, rate):
    """sd-webui-controlnet annotator tile_resample (thr_a = rate)."""
    if rate < 1.1:
        return image
    h, w = image.shape[:2]
    return cv2.resize(image, (int(float(w) / float(rate)), int(float(h) / float(rate))), interpolation=cv2.INTER_AREA)


def main():
    from controlnet_aux.canny import CannyDetector

    OUT.mkdir(parents=True, exist_ok=True)
    photos = {"astronaut": load("astronaut.png"), "camera": load("camera.png"), "faceapi1": load("faceapi_sample1.jpg")}
    # JPEG decoders differ by a level here and there (PIL's libjpeg-turbo vs the image crate), so
    # resize fixtures use only PNG inputs; "mosaic" is astronaut mirrored to 1300x1100 (short side
    # above 1024, for the area paths), which the tests rebuild the same way.
    mosaic = np.pad(photos["astronaut"], ((0, 588), (0, 788), (0, 0)), mode="symmetric")

    detector = CannyDetector()
    for name, image in photos.items():
        save(f"canny_{name}.png", cv2.Canny(image, 100, 200))
        annotated = detector(image, low_threshold=100, high_threshold=200, detect_resolution=512, image_resolution=512)
        assert (annotated[..., 0] == annotated[..., 2]).all()
        save(f"annotator_canny_{name}.png", annotated[..., 0])

    for name in ["astronaut", "camera", "mosaic"]:
        save(f"webui_canny_{name}.png", webui_canny(photos[name] if name != "mosaic" else mosaic, 512, 100, 200))
        save(f"webui_canny_{name}_300.png", webui_canny(photos[name] if name != "mosaic" else mosaic, 300, 100, 200))
    save("webui_canny_astronaut_700.png", webui_canny(photos["astronaut"], 700, 100, 200))

    resizes = [
        ("astronaut", "cubic", 300, 200),
        ("astronaut", "nearest", 123, 456),
        ("astronaut", "area", 301, 200),
        ("astronaut", "area", 256, 256),
        ("astronaut", "area", 128, 171),
        ("camera", "cubic", 600, 560),
        ("camera", "cubic", 97, 61),
        ("camera", "lanczos4", 555, 520),
        ("camera", "lanczos4", 200, 150),
        ("camera", "nearest", 640, 600),
        ("camera", "area", 540, 300),
        ("camera", "area", 170, 170),
        ("mosaic", "area", 480, 406),
        ("mosaic", "cubic", 333, 222),
    ]
    photos["mosaic"] = mosaic
    for name, interp, w, h in resizes:
        save(f"resize_{name}_{interp}_{w}x{h}.png", cv2.resize(photos[name], (w, h), interpolation=INTER[interp]))

    for name, ratio in [("astronaut", 1), ("astronaut", 24), ("mosaic", 24)]:
        save(f"color_{name}_r{ratio}.png", color_map(photos[name], ratio))
    for name, rate in [("astronaut", 2), ("mosaic", 4)]:
        save(f"tile_{name}_r{rate}.png", tile_resample(photos[name], rate))


if __name__ == "__main__":
    main()
