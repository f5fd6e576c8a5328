"""JPEG decode with the training augmentations (flip, pad-and-crop), against a loop over pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.decode import CROP_FRACTION, crop_shifts, decode_images, decode_into


def _jpegs(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def _reference(img: np.ndarray, flip: bool, dy: int, dx: int) -> np.ndarray:
    """Pixel by pixel: out[y, x] = img[clamp(y - dy), clamp(x' - dx)], x' mirrored first when flipping."""
    size = img.shape[0]
    out = np.empty_like(img)
    for y in range(size):
        for x in range(size):
            xs = size - 1 - x if flip else x
            out[y, x] = img[min(max(y - dy, 0), size - 1), min(max(xs - dx, 0), size - 1)]
    return out


@pytest.mark.parametrize("flip", [False, True])
def test_flip_and_shift_match_the_pixel_loop(flip):
    jpgs = _jpegs(4, 16)
    plain, ok = decode_images(jpgs, 16)
    assert ok.all()
    shifts = np.array([[0, 0], [2, -1], [-2, 2], [1, 0]])
    out = np.zeros((4, 16, 16, 3), np.uint8)
    assert decode_into(jpgs, out, np.full(4, flip), shifts).all()
    for i, (dy, dx) in enumerate(shifts):
        np.testing.assert_array_equal(out[i], _reference(plain[i], flip, dy, dx))
    out_flip_only = np.zeros_like(out)
    decode_into(jpgs, out_flip_only, np.array([flip, False, flip, False]))
    np.testing.assert_array_equal(out_flip_only[1], plain[1])
    np.testing.assert_array_equal(out_flip_only[0], plain[0][:, ::-1] if flip else plain[0])


def test_crop_shifts_cover_the_range_and_follow_the_hash():
    h = np.random.default_rng(1).integers(0, 2**63, size=5000, dtype=np.uint64) * np.uint64(2)
    s = crop_shifts(h, 64)
    m = 64 // CROP_FRACTION
    assert s.shape == (5000, 2) and s.dtype == np.int64
    assert s.min() == -m and s.max() == m
    assert set(np.unique(s[:, 0])) == set(range(-m, m + 1)) == set(np.unique(s[:, 1]))
    assert abs(s.mean()) < 0.2 and np.corrcoef(s[:, 0], s[:, 1])[0, 1] < 0.05  # centred, dy and dx independent
    np.testing.assert_array_equal(crop_shifts(h, 64), s)
    assert (crop_shifts(h, 7) == 0).all()  # under 8 px there is nothing to shift by
