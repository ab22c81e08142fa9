import functools
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from inputs import bad_files, odd_files

from mllm_index.actors.decode import ERROR_TYPES, decode_batch, decode_image, letterbox, open_image, to_rgb, DecodeFailure
from PIL import Image

LIMITS = dict(max_pixels=89_478_485, max_bytes=64 << 20)
# Where other images are decoded right after a timed-out one (whose abandoned thread may
# still hold a core for a moment), a limit with room for a loaded 2-core CI machine.
ROOMY = 0.5


@functools.cache
def scan_bomb(size: int = 1024, repeats: int = 3000) -> bytes:
    """A real slow input: a flat progressive JPEG whose last 14-byte scan is repeated.

    libjpeg decodes every scan over the whole image, so 45 KB take seconds, far below
    decode.max_bytes and decode.max_pixels (a known denial-of-service shape for libjpeg).
    """
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 100, 90)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    scans = [m.start() for m in re.finditer(rb"\xff\xda", data)]
    last = data[scans[-1] : data.rindex(b"\xff\xd9")]
    return data[: scans[-1]] + last * repeats + b"\xff\xd9"


@functools.cache
def untimed_decode_s() -> float:
    started = time.perf_counter()
    decode_image(scan_bomb(), 56, **LIMITS)  # timeout_s=None: no limit, it decodes
    return time.perf_counter() - started


@pytest.mark.parametrize("timeout_s", [None, 30.0])
@pytest.mark.parametrize("name", sorted(odd_files()))
def test_odd_but_valid_inputs_decode_to_rgb_with_long_side_resized(name, timeout_s):
    data, (w, h) = odd_files()[name]
    pixels, width, height = decode_image(data, 56, **LIMITS, timeout_s=timeout_s)
    assert (width, height) == (w, h)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert max(pixels.shape[:2]) == 56


@pytest.mark.parametrize("timeout_s", [None, 30.0])
@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_inputs_raise_a_classified_failure(name, timeout_s):
    data, error_type = bad_files()[name]
    with pytest.raises(DecodeFailure) as info:
        decode_image(data, 56, **LIMITS, timeout_s=timeout_s)
    assert info.value.error_type == error_type and error_type in ERROR_TYPES
    assert str(info.value)


def test_bomb_is_refused_from_the_header_with_a_configurable_limit():
    data = odd_files()["odd/photo.webp"][0]  # 320x200 = 64000 pixels
    with pytest.raises(DecodeFailure) as info:
        decode_image(data, 56, max_pixels=60_000, max_bytes=1 << 20)
    assert info.value.error_type == "decompression_bomb" and "decode.max_pixels" in str(info.value)
    with pytest.raises(DecodeFailure) as info:
        decode_image(data, 56, max_pixels=10**9, max_bytes=100)
    assert info.value.error_type == "too_large"


def test_exif_rotation_is_applied_to_pixels():
    pixels, width, height = decode_image(odd_files()["odd/exif-rotated.jpg"][0], 90, **LIMITS)
    assert pixels.shape[:2] == (90, 30)  # portrait after the transpose


def test_sixteen_bit_png_keeps_its_dynamic_range():
    pixels, _, _ = decode_image(odd_files()["odd/sixteen-bit.png"][0], 64, **LIMITS)
    assert pixels.min() < 20 and pixels.max() > 200  # not saturated to white


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]


def test_letterbox_centres_and_fills():
    out = letterbox(np.full((2, 4, 3), 9, np.uint8), 4, (1, 2, 3))
    assert out.shape == (4, 4, 3)
    assert out[0, 0].tolist() == [1, 2, 3] and out[1, 0].tolist() == [9, 9, 9]


def test_decode_batch_keeps_every_row_and_reports_read_errors(tmp_path):
    good = odd_files()["odd/photo.webp"][0]
    bad, _ = bad_files()["bad/truncated.jpg"]
    (tmp_path / "a.webp").write_bytes(good)
    (tmp_path / "b.jpg").write_bytes(bad)
    uris = [str(tmp_path / "a.webp"), str(tmp_path / "b.jpg"), str(tmp_path / "missing.jpg")]
    batch = {
        "image_id": np.arange(3), "key": np.array(["a", "b", "c"], object), "uri": np.array(uris, object),
        "kind": np.array(["file"] * 3, object), "offset": np.zeros(3, np.int64),
        "length": np.array([len(good), len(bad), 10]), "etag": np.array(["x"] * 3, object), "part": np.zeros(3, np.int32),
    }
    out = decode_batch(batch, image_size=32, fill=(0, 0, 0), storage_options={}, **LIMITS)
    assert out["ok"].tolist() == [True, False, False]
    assert out["stage"].tolist() == ["", "decode", "read"]
    assert out["error_type"][1] == "truncated" and out["error_type"][2] == "FileNotFoundError"
    assert out["pixels"].shape == (3, 32, 32, 3) and out["width"][0] == 320


def test_a_slow_decode_becomes_decode_timeout_and_the_abandoned_work_stops():
    untimed = untimed_decode_s()
    assert untimed > 0.25, f"the crafted input decodes in {untimed:.2f} s: too fast to test a 0.05 s limit"
    data = scan_bomb()  # crafted outside the timed calls
    for decode in (lambda: decode_image(data, 56, **LIMITS, timeout_s=0.05),
                   lambda: open_image(data, **LIMITS, draft_long_side=256, timeout_s=0.05)):
        started = time.perf_counter()
        with pytest.raises(DecodeFailure) as info:
            decode()
        waited = time.perf_counter() - started
        assert info.value.error_type == "decode_timeout" and "decode.timeout_s=0.05" in str(info.value)
        # Relative to the untimed decode measured in the same conditions: a loaded machine slows both.
        assert waited < untimed / 2, f"waited {waited:.2f} s for a 0.05 s limit (untimed decode: {untimed:.2f} s)"
        # The decode thread left behind sees its cancellation at its next read and ends
        # long before the decode would have (untimed from the start).
        helpers = [t for t in threading.enumerate() if t.name.startswith("decode")]
        for thread in helpers:
            thread.join(untimed / 2)
        assert helpers and not any(t.is_alive() for t in helpers)


def test_decode_batch_turns_a_slow_image_into_a_failure_row_and_goes_on(tmp_path):
    files = {"a.webp": odd_files()["odd/photo.webp"][0], "slow.jpg": scan_bomb(),
             "c.png": odd_files()["odd/rgba.png"][0], "d.jpg": odd_files()["odd/exif-rotated.jpg"][0]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    n = len(files)
    batch = {"image_id": np.arange(n), "key": np.array(list(files), object),
             "uri": np.array([str(tmp_path / k) for k in files], object), "kind": np.array(["file"] * n, object),
             "offset": np.zeros(n, np.int64), "length": np.array([len(v) for v in files.values()])}
    out = decode_batch(batch, image_size=32, fill=(0, 0, 0), storage_options={}, **LIMITS, timeout_s=ROOMY)
    assert out["ok"].tolist() == [True, False, True, True]
    assert (out["stage"][1], out["error_type"][1]) == ("decode", "decode_timeout")
    assert out["width"].tolist() == [320, -1, 320, 100] and out["height"].tolist() == [200, -1, 200, 300]
    for i, data in enumerate(files.values()):  # the images after the slow one decode as they do alone
        if i != 1:
            assert np.array_equal(out["pixels"][i], letterbox(decode_image(data, 32, **LIMITS)[0], 32, (0, 0, 0)))


def test_the_time_limit_works_in_any_calling_thread():
    """Ray Data actors (the rerank stage) call from a thread pool, where SIGALRM cannot reach."""
    with ThreadPoolExecutor(1) as pool:
        image, width, height = pool.submit(open_image, odd_files()["odd/photo.webp"][0], **LIMITS, timeout_s=5.0).result()
        assert (image.mode, width, height) == ("RGB", 320, 200)
        with pytest.raises(DecodeFailure) as info:
            pool.submit(open_image, scan_bomb(), **LIMITS, timeout_s=0.05).result()
        assert info.value.error_type == "decode_timeout"


def test_the_rerank_stage_decodes_with_the_configured_time_limit():
    from mllm_index.actors.fetch import decoded  # the candidate fetch tasks of the rerank job

    decode = {**LIMITS, "timeout_s": ROOMY}
    assert decoded(odd_files()["odd/photo.webp"][0], decode, 65_536).mode == "RGB"
    with pytest.raises(DecodeFailure) as info:
        decoded(scan_bomb(), decode, 65_536)
    assert info.value.error_type == "decode_timeout"
