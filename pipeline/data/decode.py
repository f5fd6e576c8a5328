"""JPEG bytes -> uint8 pixels (torchvision's libjpeg-turbo decode), shared by training and inference."""

from __future__ import annotations

import numpy as np

CROP_FRACTION = 8
"""``data.augment: crop`` moves an image by up to 1/CROP_FRACTION of its side in each direction
(8 px at 64 px): CIFAR's pad-4-and-crop at 32 px."""


def crop_shifts(h: np.ndarray, size: int) -> np.ndarray:
    """(B, 2) int shifts (dy, dx) in [-size/8, size/8] for ``decode_into``, from uint64 hashes ``h`` (one per image)."""
    m = np.uint64(size // CROP_FRACTION)
    span = np.uint64(2) * m + np.uint64(1)
    dy = (h >> np.uint64(32)) % span
    dx = (h & np.uint64(0xFFFFFFFF)) % span
    return np.stack([dy, dx], axis=1).astype(np.int64) - int(m)


def decode_into(jpgs, out: np.ndarray, flip=None, shift=None) -> np.ndarray:
    """Decode JPEG bytes into ``out`` (``(B, size, size, 3)`` uint8, written in place),
    resizing when needed, mirroring image i left-right when ``flip[i]`` and moving it by
    ``shift[i]`` = (dy, dx) pixels (``shift``: (B, 2) ints; the uncovered border repeats the
    edge pixels: a pad-and-crop).

    Returns a boolean mask of the inputs that decoded; ``out[i]`` is left as it was for the others.
    The flip rides on the HWC copy that is needed anyway, so it costs nothing extra; a shift
    makes that copy a gather (rows and columns by index).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import resize

    size = out.shape[1]
    ok = np.zeros(len(jpgs), dtype=bool)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) if len(b) else None for b in jpgs]
    decoded = None
    if all(t is not None for t in tensors) and tensors:
        try:  # one C++ call for the whole list; it raises if any image is bad
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            decoded = None
    for i, t in enumerate(tensors):
        if decoded is not None:
            img = decoded[i]
        else:
            if t is None:
                continue
            try:
                img = decode_jpeg(t, mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError):
                continue
        if img.shape[1] != size or img.shape[2] != size:
            img = resize(img, [size, size], antialias=True)
        hwc = img.permute(1, 2, 0).numpy()
        mirror = flip is not None and flip[i]
        if shift is not None and (shift[i][0] or shift[i][1]):
            rows = np.clip(np.arange(size) - shift[i][0], 0, size - 1)
            cols = np.clip(np.arange(size) - shift[i][1], 0, size - 1)
            out[i] = hwc[rows][:, cols[::-1] if mirror else cols]
        else:
            out[i] = hwc[:, ::-1] if mirror else hwc
        ok[i] = True
    return ok


def decode_images(jpgs, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode JPEG bytes to ``(B, size, size, 3)`` uint8, resizing when needed.

    Returns the images and a boolean mask of the inputs that decoded (bad ones are dropped
    from the images, not replaced).
    """
    out = np.empty((len(jpgs), size, size, 3), dtype=np.uint8)
    ok = decode_into(jpgs, out)
    return (out if ok.all() else out[ok]), ok
