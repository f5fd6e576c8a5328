"""Source data-set layouts read by ``jobs.make_shards``.

A layout yields :class:`ClassItems`: one identity with the images that belong to it,
as file paths or as in-memory JPEG bytes. The shard writer never looks at layouts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ClassItems:
    """One identity: its name and its images (paths on disk, or encoded JPEG bytes)."""

    name: str
    images: list[Path | bytes] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    """Stable per-image names used to build sample keys (file stem or index)."""


class LayoutError(ValueError):
    """The source tree does not have the expected layout (names the path)."""


def scan_imagefolder(root: str | Path) -> tuple[list[ClassItems], list[str]]:
    """Read an image-folder tree: ``ROOT/<identity>/<image>.jpg`` (the CASIA-WebFace layout).

    Returns the identities (sorted by name; images sorted by file name) and a list of
    problems found that did not stop the scan (empty class folders, files that are not
    images). Raises :class:`LayoutError` when ``root`` is missing, not a directory, or
    holds no class folder with images.
    """
    root = Path(root)
    if not root.exists():
        raise LayoutError(f"source folder '{root}' does not exist")
    if not root.is_dir():
        raise LayoutError(f"source '{root}' is not a directory")
    classes, problems = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        imgs, keys = [], []
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                imgs.append(f)
                keys.append(f.stem)
            elif f.is_file():
                problems.append(f"not an image (skipped): {f}")
        if not imgs:
            problems.append(f"empty class folder (skipped): {d}")
            continue
        classes.append(ClassItems(d.name, imgs, keys))
    stray = [p for p in root.iterdir() if p.is_file()]
    problems += [f"file outside a class folder (skipped): {p}" for p in sorted(stray)]
    if not classes:
        raise LayoutError(f"source folder '{root}' holds no class folder with images (expected ROOT/<identity>/<image>.jpg)")
    return classes, problems


# --- synthetic data --------------------------------------------------------------------
# Identities come in families: classes of one family share blob colours and layout and
# differ by small offsets, so they are hard to tell apart. Each image adds nuisance that
# dominates raw pixel similarity (background colour gradient, shift, noise, brightness),
# so an untrained network retrieves poorly and a trained one must learn the identity.


def _render(rng: np.random.Generator, centres: np.ndarray, colours: np.ndarray, radii: np.ndarray, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg0 = rng.uniform(30, 225, size=3).astype(np.float32)
    bg1 = np.clip(bg0 + rng.normal(0, 40, size=3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(angle) * xx + np.sin(angle) * yy) / size + 1) / 2
    img = bg0 * (1 - t[..., None]) + bg1 * t[..., None]
    shift = rng.uniform(-0.08, 0.08, size=2) * size
    for (cy, cx), colour, r in zip(centres * size + shift, colours, radii * size):
        mask = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))[..., None]
        img = img * (1 - mask) + colour * mask
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_classes(
    num_classes: int, images_per_class: int, image_size: int = 64, seed: int = 0, family_size: int = 4
) -> list[ClassItems]:
    """Generate ``num_classes`` identities of ``images_per_class`` JPEG images each.

    Classes come in families of ``family_size`` look-alikes. Deterministic for a seed.
    Returns identities named ``c00000``, ``c00001``, ... with images ``<identity>_<nnnn>``.
    """
    from PIL import Image

    if num_classes < 2 or images_per_class < 1:
        raise LayoutError("synthetic layout needs --num-classes >= 2 and --images-per-class >= 1")
    rng = np.random.default_rng(seed)
    blobs = 4
    out = []
    for c in range(num_classes):
        if c % family_size == 0:
            fam_centres = rng.uniform(0.25, 0.75, size=(blobs, 2))
            fam_colours = rng.uniform(0, 255, size=(blobs, 3))
            fam_radii = rng.uniform(0.08, 0.15, size=blobs)
        centres = fam_centres + rng.normal(0, 0.05, size=(blobs, 2))
        colours = np.clip(fam_colours + rng.normal(0, 40, size=(blobs, 3)), 0, 255)
        radii = fam_radii * rng.uniform(0.8, 1.25, size=blobs)
        items = ClassItems(f"c{c:05d}")
        for i in range(images_per_class):
            arr = _render(rng, centres, colours, radii, image_size)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            items.images.append(buf.getvalue())
            items.keys.append(f"{items.name}_{i:04d}")  # LFW-style image names: <identity>_<nnnn>
        out.append(items)
    return out
