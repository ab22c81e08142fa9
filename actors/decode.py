"""Decode stage: fetch bytes, decode safely, resize, letterbox to the backbone's square input.

We decode ourselves instead of `ray.data.read_images`, which fails the whole job on one
truncated JPEG: here every bad input becomes a row with `ok=False`, a stage, an error
type and a message, and the job goes on. Pixels leave this stage as a fixed-shape
(S, S, 3) uint8 tensor (long side resized to S, padded with the normalisation mean), so
the GPU actor only normalises and runs the model.
"""

from __future__ import annotations

import io
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mllm_index.storage.sources import fetch_bytes_counted
from mllm_index.storage.uris import redact_text

PASS_THROUGH = ("image_id", "key", "uri", "kind", "offset", "length", "etag", "part", "bbox")


# The decode stage's failure taxonomy (stage "decode"; the read stage reports exception names).
ERROR_TYPES = {
    "empty": "0 bytes",
    "too_large": "more bytes than decode.max_bytes",
    "truncated": "cut-off or header-only file",
    "not_an_image": "random bytes, text, an HTML page",
    "unsupported_format": "SVG (vector)",
    "decompression_bomb": "width x height > decode.max_pixels, refused from the header",
    "decode_error": "anything else PIL rejects",
    "unsupported_mode": "a pixel mode that cannot become RGB",
    "bad_bbox": "a crop box outside the image",
    "decode_timeout": "decoding ran past decode.timeout_s",
}


class DecodeFailure(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class Deadline:
    """When one image's decode must end; `check` raises `decode_timeout` past it or once cancelled."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s if timeout_s is not None else float("inf")
        self.cancelled = False

    def check(self, step: str) -> None:
        if self.cancelled or time.monotonic() > self.end:
            raise DecodeFailure("decode_timeout", f"decoding ran past decode.timeout_s={self.timeout_s} s ({step})")


class _TimedBytes(io.BytesIO):
    """The compressed bytes; PIL reads them between its C decoder calls, so every read is a deadline check."""

    def __init__(self, data: bytes, deadline: Deadline):
        super().__init__(data)
        self.deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        self.deadline.check("reading")
        return super().read(size)


# Compressed bytes handed to PIL's C decoder per call (PIL's default is 64 KiB). A
# progressive JPEG that repeats a 14-byte scan 1000 times (38 KB, 2000x2000) decodes for
# ~3 s; with 64 KiB reads all of it is one C call, with 4 KiB reads one call lasts at most
# ~0.8 s, which bounds the work a timed-out decode does before it sees its cancellation.
# Plain JPEG and PNG decode as fast with 4 KiB reads (measured within 15%).
READ_BLOCK = 4096


_callers = threading.local()  # one decode thread per calling thread, kept while it finishes in time


def within_time(timeout_s: float | None, work):
    """`work(deadline)`, but the caller waits at most `timeout_s`, then gets a `decode_timeout` failure.

    Why a second thread: PIL decodes in C, and one C call can run for seconds (see
    READ_BLOCK), so nothing that runs Python code in the decoding thread interrupts it.
    SIGALRM/setitimer would not either: a Python signal handler runs only when the C call
    returns, and only in the main thread; Ray runs tasks (and `map_batches` functions) in the
    worker's main thread, but Ray Data actors, such as the rerank stage's, in a thread pool.
    So the decode runs in a helper thread (PIL releases the GIL while it decodes) and the
    caller waits at most `timeout_s`, whatever the decoder does and in whichever thread the
    caller is. A decode that overruns is cancelled cooperatively: the Deadline is checked at
    each read of the compressed stream and between steps, so the abandoned thread stops at
    its next check (within one READ_BLOCK of decoding, or one pass bounded by
    decode.max_pixels for decoders that take the whole file in one call: WebP, libtiff),
    and the caller gets a fresh helper thread. The helper is reused while decodes finish in
    time: a thread per image cost ~0.4 ms of CPU, a reused one ~0.05 ms (a 96x64 JPEG
    decodes in ~0.5 ms). A process per image would bound the work hard, but costs far more
    and a copy of the pixels.
    """
    deadline = Deadline(timeout_s)
    if timeout_s is None:
        return work(deadline)
    pool = getattr(_callers, "pool", None)
    if pool is None:
        pool = _callers.pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
    future = pool.submit(work, deadline)
    done, _ = wait([future], timeout=timeout_s)
    if not done:
        deadline.cancelled = True
        pool.shutdown(wait=False)  # its thread exits once the abandoned decode sees the cancellation
        _callers.pool = None
        raise DecodeFailure("decode_timeout", f"decoding ran past decode.timeout_s={timeout_s} s")
    return future.result()


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
               bbox=None, timeout_s: float | None = None) -> tuple[Image.Image, int, int]:
    """(upright RGB image, width, height of the upright original); raises DecodeFailure.

    The size check happens on the header, before any pixel is decoded. `draft_long_side`
    lets libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale (not used with a bbox, whose
    coordinates refer to the full-resolution upright image, which is cropped to it).
    Past `timeout_s` (None: no limit) the decode is a `decode_timeout` failure (`within_time`).
    """
    return within_time(timeout_s, lambda deadline: _open(data, max_pixels, max_bytes, draft_long_side, bbox, deadline))


def _open(data: bytes, max_pixels: int, max_bytes: int, draft_long_side: int | None, bbox,
          deadline: Deadline) -> tuple[Image.Image, int, int]:
    if not data:
        raise DecodeFailure("empty", "0 bytes")
    if len(data) > max_bytes:
        raise DecodeFailure("too_large", f"{len(data)} bytes > decode.max_bytes={max_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(_TimedBytes(data, deadline))  # reads the header only
        except DecodeFailure:
            raise
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
            img.decodermaxblock = READ_BLOCK
            img.load()
        except DecodeFailure:
            raise
        except Exception as exc:
            raise _classify(exc) from None
        deadline.check("decoded")
        try:
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                width, height = height, width
            ImageOps.exif_transpose(img, in_place=True)  # no copy of an image that is already upright
        except Exception:
            pass  # a malformed EXIF block only loses the orientation hint, never the image
        deadline.check("orientation")
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


def decode_image(data: bytes, image_size: int, max_pixels: int, max_bytes: int, bbox=None,
                 timeout_s: float | None = None) -> tuple[np.ndarray, int, int]:
    """(pixels HxWx3 uint8 with long side == image_size, width, height); raises DecodeFailure.

    `timeout_s` bounds the whole of it, resize included (None: no limit).
    """
    return within_time(timeout_s, lambda deadline: _decode(data, image_size, max_pixels, max_bytes, bbox, deadline))[:3]


def cap_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale so that width x height <= max_pixels (bounds the visual tokens per image)."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)


def _decode(data: bytes, image_size: int, max_pixels: int, max_bytes: int, bbox, deadline: Deadline,
            keep_max_pixels: int | None = None) -> tuple[np.ndarray, int, int, Image.Image | None]:
    """(pixels for the embedder, width, height, the image capped to keep_max_pixels or None): one decode
    serves both the embedder and, in the rerank job, the scorer's copy of the query."""
    draft = max(image_size, int(2 * keep_max_pixels ** 0.5)) if keep_max_pixels else image_size
    img, width, height = _open(data, max_pixels, max_bytes, draft, bbox, deadline)
    kept = cap_pixels(img, keep_max_pixels) if keep_max_pixels else None
    w, h = img.size
    scale = image_size / max(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    if target != img.size:
        img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 1 else None)
    deadline.check("resized")
    return np.asarray(img, dtype=np.uint8), width, height, kept


def letterbox(pixels: np.ndarray, image_size: int, fill: tuple[int, int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Centre an image in an SxS canvas of the fill colour (keeps all content, no crop).

    `out`: the canvas to write (a row of the batch's array), so the image is copied once and
    only the bands around it are filled (filling the whole canvas first cost as much as the copy)."""
    canvas = np.empty((image_size, image_size, 3), dtype=np.uint8) if out is None else out
    h, w = pixels.shape[:2]
    top, left = (image_size - h) // 2, (image_size - w) // 2
    colour = np.asarray(fill, np.uint8)
    canvas[:top] = colour
    canvas[top + h :] = colour
    canvas[top : top + h, :left] = colour
    canvas[top : top + h, left + w :] = colour
    canvas[top : top + h, left : left + w] = pixels
    return canvas


def decode_batch(batch: dict[str, np.ndarray], *, image_size: int, fill: tuple[int, int, int], max_pixels: int,
                 max_bytes: int, storage_options: dict, image_column: str = "image",
                 timeout_s: float | None = None, keep_max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: catalog rows in, rows with pixels or a failure reason out (same count).

    `timeout_s` is per image (decode.timeout_s): a slow image becomes a `decode_timeout` row and the batch goes on.
    `keep_max_pixels` (the rerank job's queries) also keeps the decoded image, capped to that many pixels, in an
    `query_image` column for the scorer, so a query is fetched and decoded once.
    """
    n = len(batch["image_id"])
    entries = [{k: batch[k][i] for k in ("uri", "kind", "offset", "length")} for i in range(n)]
    payloads, retries = fetch_bytes_counted(entries, storage_options, image_column)  # retries: per row, for the summary
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    width = np.full(n, -1, np.int32)
    height = np.full(n, -1, np.int32)
    ok = np.zeros(n, bool)
    kept = np.empty(n, dtype=object)
    stage, error_type, message = [""] * n, [""] * n, [""] * n
    for i, data in enumerate(payloads):
        if isinstance(data, BaseException):
            stage[i], error_type[i], message[i] = "read", type(data).__name__, redact_text(str(data))[:500]
            continue
        try:
            bbox = batch["bbox"][i] if "bbox" in batch else None
            arr, width[i], height[i], kept[i] = within_time(
                timeout_s, lambda deadline: _decode(data, image_size, max_pixels, max_bytes, bbox, deadline, keep_max_pixels))
            letterbox(arr, image_size, fill, out=pixels[i])
            ok[i] = True
        except DecodeFailure as exc:
            stage[i], error_type[i], message[i] = "decode", exc.error_type, str(exc)[:500]
        except Exception as exc:  # anything PIL did not anticipate still becomes a row, not a crash
            stage[i], error_type[i], message[i] = "decode", "decode_error", f"{type(exc).__name__}: {exc}"[:500]
    out = {k: batch[k] for k in PASS_THROUGH if k in batch}
    out.update(width=width, height=height, ok=ok, stage=np.array(stage, dtype=object),
               error_type=np.array(error_type, dtype=object), message=np.array(message, dtype=object), pixels=pixels,
               retries=np.array(retries, np.int32))
    if keep_max_pixels:
        out["query_image"] = kept
    return out
