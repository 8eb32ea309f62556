"""Fixtures of crates/diffusion/tests/inpaint_overlay.rs: the WebUI's final inpainting composite
("whole picture" mode), written here with the same calls as AUTOMATIC1111's processing.py
(`mask_blur` as two cv2.GaussianBlur passes, `mask_for_overlay` = clip(2 * blurred), the original
pasted through the inverted overlay mask into an RGBa image, then alpha-composited over the result).

    .venv-ref/bin/python tools/reference/inpaint_overlay.py
"""
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageOps

OUT = Path(__file__).resolve().parents[2] / "crates/diffusion/tests/fixtures/inpaint_overlay"


def webui_blur(mask: Image.Image, blur: int) -> Image.Image:
    np_mask = np.array(mask)
    kernel_size = 2 * int(2.5 * blur + 0.5) + 1
    np_mask = cv2.GaussianBlur(np_mask, (kernel_size, 1), blur)
    np_mask = cv2.GaussianBlur(np_mask, (1, kernel_size), blur)
    return Image.fromarray(np_mask)


def webui_overlay(generated: Image.Image, original: Image.Image, blurred: Image.Image) -> Image.Image:
    np_mask = np.clip(np.array(blurred).astype(np.float32) * 2, 0, 255).astype(np.uint8)
    mask_for_overlay = Image.fromarray(np_mask)
    image_masked = Image.new("RGBa", (original.width, original.height))
    image_masked.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    overlay = image_masked.convert("RGBA")
    image = generated.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB"), mask_for_overlay


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for name, (w, h), blur in [("case_a", (96, 72), 8), ("case_b", (61, 45), 4)]:
        # A smooth "photo" and a noisy "generation", so both halves of the blend are visible.
        yy, xx = np.mgrid[0:h, 0:w]
        original = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)
        generated = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse((w // 4, h // 5, 3 * w // 4, 4 * h // 5), fill=255)
        blurred = webui_blur(mask, blur)
        result, mask_for_overlay = webui_overlay(Image.fromarray(generated), Image.fromarray(original), blurred)
        Image.fromarray(original).save(OUT / f"{name}_original.png")
        Image.fromarray(generated).save(OUT / f"{name}_generated.png")
        mask.save(OUT / f"{name}_mask.png")
        blurred.save(OUT / f"{name}_blurred.png")
        mask_for_overlay.save(OUT / f"{name}_overlay.png")
        result.save(OUT / f"{name}_expected.png")
        (OUT / f"{name}_blur.txt").write_text(f"{blur}\n")


if __name__ == "__main__":
    main()
