"""Writes the image-input test files of crates/face (PNG, JPEG, BMP, TIFF; EXIF orientation, grey,
alpha, 16-bit, corrupt, unsupported, decompression bomb) and what EasyPhoto's loader makes of them.

EasyPhoto reads an upload as `ImageOps.exif_transpose(Image.open(f)).convert("RGB")`
(scripts/easyphoto_train.py); the expected pixels are exactly that, except for 16-bit grey, where
Pillow clips values above 255 (most of such an image turns white) and the crate scales instead:
the expectation there is round(v * 255 / 65535).

    .venv-ref/bin/python tools/reference/face_image_inputs.py
"""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "crates/face/tests/assets/images"
FIXTURES = ROOT / "crates/face/tests/fixtures"


def blocks(width, height, cell=8):
    """Flat 8x8 colour cells (JPEG-friendly), each a different colour."""
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = xs // cell, ys // cell
    r = (cx * 60 + 20) % 256
    g = (cy * 90 + 40) % 256
    b = ((cx + 3 * cy) * 37 + 10) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def easyphoto_rgb(data):
    return np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def png_chunk(kind, payload):
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def main():
    ASSETS.mkdir(parents=True, exist_ok=True)
    files, expected = {}, {}
    base = blocks(32, 16)

    for orientation in (3, 6, 8):
        buf = io.BytesIO()
        Image.fromarray(base).save(buf, "JPEG", quality=95, exif=exif_with_orientation(orientation))
        files[f"exif_orientation_{orientation}.jpg"] = buf.getvalue()

    buf = io.BytesIO()  # PNG eXIf chunk, orientation 5 (transpose): lossless, compared exactly
    Image.fromarray(base).save(buf, "PNG", exif=exif_with_orientation(5))
    files["exif_orientation_5.png"] = buf.getvalue()

    grey = (np.arange(16 * 24).reshape(16, 24) * 7 % 256).astype(np.uint8)
    alpha = (np.arange(16 * 24).reshape(16, 24) * 13 % 256).astype(np.uint8)
    for name, img in [
        ("grey.png", Image.fromarray(grey, "L")),
        ("grey_alpha.png", Image.fromarray(np.stack([grey, alpha], -1), "LA")),
        ("rgba.png", Image.fromarray(np.concatenate([blocks(24, 16), alpha[..., None]], -1), "RGBA")),
    ]:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        files[name] = buf.getvalue()

    grey16 = (np.arange(16 * 24).reshape(16, 24) * 171 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, "PNG")  # mode I;16
    files["grey16.png"] = buf.getvalue()
    scaled = np.floor(grey16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    expected["grey16.png"] = np.repeat(scaled[..., None], 3, -1)

    # BMP (24-bit, and 8-bit grey with a palette) and TIFF (LZW RGB, RGBA, 16-bit grey).
    for name, img, fmt, opts in [
        ("rgb.bmp", Image.fromarray(blocks(24, 16)), "BMP", {}),
        ("grey.bmp", Image.fromarray(grey, "L"), "BMP", {}),
        ("rgb_lzw.tif", Image.fromarray(blocks(24, 16)), "TIFF", {"compression": "tiff_lzw"}),
        ("rgba.tif", Image.fromarray(np.concatenate([blocks(24, 16), alpha[..., None]], -1), "RGBA"), "TIFF", {}),
        ("grey16.tif", Image.fromarray(grey16), "TIFF", {}),
    ]:
        buf = io.BytesIO()
        img.save(buf, fmt, **opts)
        files[name] = buf.getvalue()
    expected["grey16.tif"] = expected["grey16.png"]
    files["truncated.bmp"] = files["rgb.bmp"][: len(files["rgb.bmp"]) // 2]
    files["truncated.tif"] = files["rgb_lzw.tif"][: len(files["rgb_lzw.tif"]) // 2]

    files["truncated.png"] = files["rgba.png"][: len(files["rgba.png"]) // 2]
    files["empty.png"] = b""
    files["not_an_image.png"] = b"this is a text file, not a picture\n"
    buf = io.BytesIO()
    Image.fromarray(grey, "L").save(buf, "GIF")
    files["unsupported.gif"] = buf.getvalue()
    # A 100000 x 100000 RGB PNG header (30 GB decoded) with one empty row of data.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    files["bomb.png"] = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")

    for name, data in files.items():
        (ASSETS / name).write_bytes(data)
        if name not in expected and name.endswith((".jpg", ".png", ".bmp", ".tif")) and not name.startswith(
            ("truncated.", "empty.", "not_an_image.", "bomb.")):
            expected[name] = easyphoto_rgb(data)
    # The raw RGB under the RGBA/LA alpha, to show alpha is dropped rather than composited.
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(expected.items())},
              FIXTURES / "image_inputs.safetensors")


if __name__ == "__main__":
    main()
