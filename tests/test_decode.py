import numpy as np
import pytest
from inputs import bad_files, odd_files

from mllm_index.actors.decode import decode_batch, decode_image, letterbox, to_rgb, DecodeFailure
from PIL import Image

LIMITS = dict(max_pixels=89_478_485, max_bytes=64 << 20)


@pytest.mark.parametrize("name", sorted(odd_files()))
def test_odd_but_valid_inputs_decode_to_rgb_with_long_side_resized(name):
    data, (w, h) = odd_files()[name]
    pixels, width, height = decode_image(data, 56, **LIMITS)
    assert (width, height) == (w, h)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert max(pixels.shape[:2]) == 56


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_inputs_raise_a_classified_failure(name):
    data, error_type = bad_files()[name]
    with pytest.raises(DecodeFailure) as info:
        decode_image(data, 56, **LIMITS)
    assert info.value.error_type == error_type
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
