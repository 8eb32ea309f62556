"""Fixtures of crates/pipeline/tests/latent_mask.rs: the WebUI's latent inpainting mask, written
with the same calls as AUTOMATIC1111's `StableDiffusionProcessingImg2Img.init` (the mask blurred
by `mask_blur` with two cv2.GaussianBlur passes, then
`init_mask.convert('RGB').resize((latent_w, latent_h))` with Pillow's default filter (BICUBIC),
channel 0 divided by 255 and `np.around`).

    .venv-ref/bin/python tools/reference/pipeline_latent_mask.py
"""
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[2] / "crates/pipeline/tests/fixtures/latent_mask"


def webui_blur(mask: np.ndarray, blur: int) -> np.ndarray:
    kernel_size = 2 * int(2.5 * blur + 0.5) + 1
    mask = cv2.GaussianBlur(mask, (kernel_size, 1), blur)
    return cv2.GaussianBlur(mask, (1, kernel_size), blur)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    for name, (w, h), blur in [("face_512x768", (512, 768), 8), ("ring_200x136", (200, 136), 8), ("blobs_96x72", (96, 72), 4)]:
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        if name.startswith("face"):
            draw.ellipse((w // 4, h // 5, 3 * w // 4, 3 * h // 5), fill=255)
        elif name.startswith("ring"):
            draw.rectangle((w // 6, h // 6, 5 * w // 6, 5 * h // 6), fill=255)
            draw.rectangle((w // 3, h // 3, 2 * w // 3, 2 * h // 3), fill=0)
        else:
            for _ in range(6):
                x, y = rng.integers(0, w), rng.integers(0, h)
                r = rng.integers(4, 20)
                draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        blurred = Image.fromarray(webui_blur(np.array(mask), blur))
        latent = blurred.convert("RGB").resize((w // 8, h // 8))
        channel = np.array(latent)[:, :, 0]
        latmask = np.around(np.array(latent, dtype=np.float32)[:, :, 0] / 255)
        blurred.save(OUT / f"{name}_blurred.png")
        Image.fromarray(channel).save(OUT / f"{name}_resized.png")
        Image.fromarray(np.uint8(latmask * 255)).save(OUT / f"{name}_latmask.png")


if __name__ == "__main__":
    main()
