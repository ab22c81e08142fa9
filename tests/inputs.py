"""Bad and odd image files with the outcome the index job must give each of them.

`ODD` files are valid images in unusual shapes, modes or names: they must be indexed.
`BAD` files must each become one failures row with the given error type.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 320, h: int = 200, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    noise = rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _exif_rotated() -> bytes:
    img = _photo(300, 100, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: stored 300x100, shown 100x300
    return _encode(img, "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [_photo(64, 48, seed=s).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-looking PNG whose header claims 10^10 pixels."""
    small = _encode(Image.new("L", (8, 8)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return small[:8] + patched + small[8 + 25 :]


def odd_files() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """name -> (bytes, (width, height) expected in the catalog)."""
    photo = _photo()
    png16 = Image.fromarray((np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 30).astype(np.uint16))
    return {
        "odd/gray.jpg": (_encode(photo.convert("L"), "JPEG"), (320, 200)),
        "odd/cmyk.jpg": (_encode(photo.convert("CMYK"), "JPEG"), (320, 200)),
        "odd/rgba.png": (_encode(photo.convert("RGBA"), "PNG"), (320, 200)),
        "odd/palette.png": (_encode(photo.convert("P"), "PNG"), (320, 200)),
        "odd/animated.gif": (_animated_gif(), (64, 48)),
        "odd/photo.webp": (_encode(photo, "WEBP"), (320, 200)),
        "odd/photo.tiff": (_encode(photo, "TIFF"), (320, 200)),
        "odd/sixteen-bit.png": (_encode(png16, "PNG"), (64, 32)),
        "odd/one-pixel.png": (_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), (1, 1)),
        "odd/strip.png": (_encode(_photo(4000, 8, seed=1), "PNG"), (4000, 8)),
        "odd/exif-rotated.jpg": (_exif_rotated(), (100, 300)),
        "odd/png-named.jpg": (_encode(photo, "PNG"), (320, 200)),
        "odd/no-extension": (_encode(photo, "JPEG"), (320, 200)),
        "odd/with space ünïcødé 写真.jpg": (_encode(photo, "JPEG"), (320, 200)),
    }


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected error_type)."""
    jpeg = _encode(_photo(), "JPEG")
    png = _encode(_photo(), "PNG")
    return {
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bad/empty.jpg": (b"", "empty"),
        "bad/random.jpg": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image"),
        "bad/error-page.jpg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "not_an_image"),
        "bad/notes.png": (b"just some text, not pixels\n" * 10, "not_an_image"),
        "bad/header-only.png": (png[:33], "truncated"),
        "bad/bomb.png": (_png_bomb(), "decompression_bomb"),
        "bad/vector.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
                           "unsupported_format"),
    }
