"""Decode stage: fetch bytes, decode safely, resize, letterbox to the backbone's square input.

We decode ourselves instead of `ray.data.read_images`, which fails the whole job on one
truncated JPEG: here every bad input becomes a row with `ok=False`, a stage, an error
type and a message, and the job goes on. Pixels leave this stage as a fixed-shape
(S, S, 3) uint8 tensor (long side resized to S, padded with the normalisation mean), so
the GPU actor only normalises and runs the model.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mllm_index.storage.sources import fetch_bytes
from mllm_index.storage.uris import redact_text

PASS_THROUGH = ("image_id", "key", "uri", "kind", "offset", "length", "etag", "part", "bbox")


class DecodeFailure(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"II*\x00": "TIFF",
         b"MM\x00*": "TIFF", b"BM": "BMP"}


def _sniff(data: bytes) -> DecodeFailure:
    """Name what a non-image really is, so the failures table is actionable."""
    for magic, fmt in MAGIC.items():
        if data.startswith(magic):
            return DecodeFailure("truncated", f"{fmt} signature but PIL cannot parse it ({len(data)} bytes): header only or cut short")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return DecodeFailure("truncated", f"WEBP signature but PIL cannot parse it ({len(data)} bytes)")
    head = data[:1024].lstrip().lower()
    if b"<svg" in head or (head.startswith(b"<?xml") and b"svg" in head):
        return DecodeFailure("unsupported_format", "SVG (vector) images are not decoded; rasterise them first")
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return DecodeFailure("not_an_image", "HTML document, not an image (an error page saved under an image name?)")
    try:
        data[:1024].decode("utf-8")
        return DecodeFailure("not_an_image", "text content, not an image")
    except UnicodeDecodeError:
        return DecodeFailure("not_an_image", "unrecognised bytes: no known image format")


def _classify(exc: Exception) -> DecodeFailure:
    """Failure type of an exception raised while PIL parses or decodes the data."""
    if isinstance(exc, Image.DecompressionBombError):
        return DecodeFailure("decompression_bomb", str(exc))
    text = str(exc).lower()
    if isinstance(exc, (OSError, SyntaxError)) and ("truncat" in text or "broken data stream" in text or "premature end" in text):
        return DecodeFailure("truncated", f"{type(exc).__name__}: {exc}")
    return DecodeFailure("decode_error", f"{type(exc).__name__}: {exc}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha over white, 16-bit and float scaled to 8 bits."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def open_image(data: bytes, max_pixels: int, max_bytes: int, draft_long_side: int | None = None,
               bbox=None) -> tuple[Image.Image, int, int]:
    """(upright RGB image, width, height of the upright original); raises DecodeFailure.

    The size check happens on the header, before any pixel is decoded. `draft_long_side`
    lets libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale (not used with a bbox, whose
    coordinates refer to the full-resolution upright image, which is cropped to it).
    """
    if not data:
        raise DecodeFailure("empty", "0 bytes")
    if len(data) > max_bytes:
        raise DecodeFailure("too_large", f"{len(data)} bytes > decode.max_bytes={max_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except UnidentifiedImageError:
            raise _sniff(data) from None
        except Exception as exc:
            raise _classify(exc) from None
        width, height = img.size
        if width <= 0 or height <= 0:
            raise DecodeFailure("decode_error", f"invalid size {width}x{height}")
        if width * height > max_pixels:
            raise DecodeFailure("decompression_bomb", f"{width}x{height} = {width * height} pixels > decode.max_pixels={max_pixels}")
        try:
            scale = draft_long_side / max(width, height) if draft_long_side and bbox is None else 1.0
            if img.format == "JPEG" and scale < 1:
                img.draft("RGB", (max(1, int(width * scale + 1)), max(1, int(height * scale + 1))))
            img.load()
        except Exception as exc:
            raise _classify(exc) from None
        try:
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                width, height = height, width
            img = ImageOps.exif_transpose(img) or img
        except Exception:
            pass  # a malformed EXIF block only loses the orientation hint, never the image
        try:
            img = to_rgb(img)
        except Exception as exc:
            raise DecodeFailure("unsupported_mode", f"mode {img.mode}: {type(exc).__name__}: {exc}") from None
    if bbox is not None and np.all(np.isfinite(bbox)):
        img = crop_to_bbox(img, bbox)
    return img, width, height


def crop_to_bbox(img: Image.Image, bbox) -> Image.Image:
    """Crop to (x, y, w, h) in pixels, clipped to the image; an empty box is an error."""
    x, y, w, h = (float(v) for v in bbox)
    left, top = max(0, int(round(x))), max(0, int(round(y)))
    right, bottom = min(img.width, int(round(x + w))), min(img.height, int(round(y + h)))
    if right <= left or bottom <= top:
        raise DecodeFailure("bad_bbox", f"bbox {tuple(bbox)} has no overlap with the {img.width}x{img.height} image")
    return img.crop((left, top, right, bottom))


def decode_image(data: bytes, image_size: int, max_pixels: int, max_bytes: int, bbox=None) -> tuple[np.ndarray, int, int]:
    """(pixels HxWx3 uint8 with long side == image_size, width, height); raises DecodeFailure."""
    img, width, height = open_image(data, max_pixels, max_bytes, draft_long_side=image_size, bbox=bbox)
    w, h = img.size
    scale = image_size / max(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    if target != img.size:
        img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 1 else None)
    return np.asarray(img, dtype=np.uint8), width, height


def letterbox(pixels: np.ndarray, image_size: int, fill: tuple[int, int, int]) -> np.ndarray:
    """Centre an image in an SxS canvas of the fill colour (keeps all content, no crop)."""
    canvas = np.empty((image_size, image_size, 3), dtype=np.uint8)
    canvas[:] = fill
    h, w = pixels.shape[:2]
    top, left = (image_size - h) // 2, (image_size - w) // 2
    canvas[top : top + h, left : left + w] = pixels
    return canvas


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, fill: tuple[int, int, int], max_pixels: int,
                 max_bytes: int, storage_options: dict, image_column: str = "image") -> dict[str, np.ndarray]:
    """Ray Data batch UDF: catalog rows in, rows with pixels or a failure reason out (same count)."""
    n = len(batch["image_id"])
    entries = [{k: batch[k][i] for k in ("uri", "kind", "offset", "length")} for i in range(n)]
    payloads = fetch_bytes(entries, storage_options, image_column)
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    width = np.full(n, -1, np.int32)
    height = np.full(n, -1, np.int32)
    ok = np.zeros(n, bool)
    stage, error_type, message = [""] * n, [""] * n, [""] * n
    for i, data in enumerate(payloads):
        if isinstance(data, BaseException):
            stage[i], error_type[i], message[i] = "read", type(data).__name__, redact_text(str(data))[:500]
            continue
        try:
            bbox = batch["bbox"][i] if "bbox" in batch else None
            arr, width[i], height[i] = decode_image(data, image_size, max_pixels, max_bytes, bbox=bbox)
            pixels[i] = letterbox(arr, image_size, fill)
            ok[i] = True
        except DecodeFailure as exc:
            stage[i], error_type[i], message[i] = "decode", exc.error_type, str(exc)[:500]
        except Exception as exc:  # anything PIL did not anticipate still becomes a row, not a crash
            stage[i], error_type[i], message[i] = "decode", "decode_error", f"{type(exc).__name__}: {exc}"[:500]
    out = {k: batch[k] for k in PASS_THROUGH if k in batch}
    out.update(width=width, height=height, ok=ok, stage=np.array(stage, dtype=object),
               error_type=np.array(error_type, dtype=object), message=np.array(message, dtype=object), pixels=pixels)
    return out
