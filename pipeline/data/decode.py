"""JPEG bytes -> uint8 pixels (torchvision's libjpeg-turbo decode), shared by training and inference."""

from __future__ import annotations

import numpy as np


def decode_into(jpgs, out: np.ndarray, flip=None) -> np.ndarray:
    """Decode JPEG bytes into ``out`` (``(B, size, size, 3)`` uint8, written in place),
    resizing when needed and mirroring image i left-right when ``flip[i]``.

    Returns a boolean mask of the inputs that decoded; ``out[i]`` is left as it was for the others.
    The flip rides on the HWC copy that is needed anyway, so it costs nothing extra.
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
        out[i] = hwc[:, ::-1] if flip is not None and flip[i] else hwc
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


def pack_jpegs(jpgs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """JPEG bytes -> ``(buffer, offsets)``: one flat uint8 array and ``len(jpgs) + 1`` int64 offsets.

    How a stream row carries a slice's JPEG bytes with ``data.decode_device: cuda`` (image i is
    ``buffer[offsets[i]:offsets[i + 1]]``): one ragged uint8 column per row, which Ray Data
    hands to ``iter_torch_batches(batch_size=1)`` as a (1, L) tensor.
    """
    offsets = np.zeros(len(jpgs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in jpgs])
    buf = np.frombuffer(b"".join(jpgs), dtype=np.uint8) if offsets[-1] else np.zeros(0, dtype=np.uint8)
    return buf, offsets


def decode_batch(buf, offsets, flips, size: int, device) -> tuple:
    """Decode a packed slice (:func:`pack_jpegs`) on ``device``: ``(images (B, size, size, 3) uint8 on
    device, ok (B,) bool)``, image i mirrored left-right when ``flips[i]``.

    One ``torchvision.io.decode_jpeg`` call for the list (batched nvJPEG on a CUDA device;
    libjpeg-turbo on the CPU, the decode of :func:`decode_into`), then resizing when needed and
    the flip, on the device. If the batched call fails (a corrupt image), images are decoded one
    by one and those that fail are left zero with ``ok`` False (the caller replaces them).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import resize

    device = torch.device(device)
    buf = torch.as_tensor(buf).reshape(-1).cpu()
    offsets = [int(o) for o in torch.as_tensor(offsets).reshape(-1)]
    flips = torch.as_tensor(flips).reshape(-1).cpu().tolist() if flips is not None else None
    parts = [buf[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    out = torch.zeros((len(parts), size, size, 3), dtype=torch.uint8, device=device)
    ok = torch.zeros(len(parts), dtype=torch.bool)
    try:
        decoded = decode_jpeg(parts, mode=ImageReadMode.RGB, device=device) if parts else []
    except (RuntimeError, ValueError):
        decoded = []
        for p in parts:
            try:
                decoded.append(decode_jpeg(p, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                decoded.append(None)
    for i, img in enumerate(decoded):
        if img is None:
            continue
        if img.shape[1] != size or img.shape[2] != size:
            img = resize(img, [size, size], antialias=True)
        if flips is not None and flips[i]:
            img = img.flip(-1)
        out[i] = img.permute(1, 2, 0)
        ok[i] = True
    return out, ok
