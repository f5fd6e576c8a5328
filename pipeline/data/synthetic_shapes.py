"""A second synthetic data set, harder than the quickstart's blobs: textured shapes with mirror twins.

``jobs.make_shards --layout synthetic_shapes`` writes it (default 600 classes of 30-60 images).
Why a second generator: one generator can be gamed (a default that suits the blobs of
``pipeline.data.layouts.synthetic_classes`` need not suit anything else), so benchmarks
report both. What differs from the blobs:

* **Shape and fine texture.** A class is a closed shape (a radius that varies with the
  angle, five Fourier terms) filled with a fine grating (period 3-6 px at 64 px, its own
  orientation, phase and second colour) and an off-centre dot. Classes of one family (4
  classes) share the coarse shape and the colours; they differ by the shape's finer terms,
  the grating and the dot, so coarse features alone do not separate them.
* **Mirror-asymmetric, with mirror twins.** No class is symmetric, and every odd class is
  the exact mirror image of the class before it (its shape, grating and dot reflected
  left-right in the shape's own frame). A horizontal flip turns an image of one class into
  an image of another, as for text (b/d): ``data.augment: flip`` is wrong here by
  construction, and a network must see handedness to tell twins apart.
* **Nuisance per image:** shift (+-10%), scale (0.85-1.15), rotation (+-15 degrees),
  background gradient, brightness, colour jitter and pixel noise.

Deterministic for a seed; images are JPEG bytes named ``<identity>_<nnnn>`` like the other
synthetic layout.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline.data.layouts import ClassItems, LayoutError

HARMONICS = 5
"""Fourier terms of a shape's radius; the first two are shared by a family (the coarse shape)."""


def _class_params(rng: np.random.Generator, family: dict) -> dict:
    """One class of ``family``: its own fine shape terms, grating and dot (not yet mirrored)."""
    coef = family["coef"].copy()
    coef[2:] += rng.normal(0, 0.05, size=(HARMONICS - 2, 2))
    return {
        "coef": coef,
        "colours": family["colours"] + rng.normal(0, 12, size=(2, 3)),
        "freq": rng.uniform(1 / 6, 1 / 3),  # cycles per pixel at 64 px: a 3-6 px period
        "theta": rng.uniform(0.15, np.pi - 0.15) * rng.choice([-1, 1]),  # never near 0 or 90 degrees: mirror != itself
        "phase": rng.uniform(0, 2 * np.pi),
        "dot": np.array([rng.uniform(0.25, 0.5) * rng.choice([-1, 1]), rng.uniform(-0.4, 0.4)]),
        "mirror": False,
    }


def _mirrored(params: dict) -> dict:
    """The class's mirror twin: x -> -x in the shape's frame (angle phi -> pi - phi)."""
    out = dict(params, mirror=not params["mirror"])
    return out


def render_shape(params: dict, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One (size, size, 3) uint8 image of a class; ``rng`` None = the clean prototype (no nuisance).

    The shape lives in its own frame (u, v) in units of the image side, centred; a mirrored
    class reads u as -u, so its image is exactly the left-right mirror of its twin's (when the
    nuisance draws match).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x = (xx + 0.5) / size - 0.5
    y = (yy + 0.5) / size - 0.5
    if rng is None:
        shift, scale, angle, gain = np.zeros(2), 1.0, 0.0, 1.0
        bg = np.full((size, size, 3), 128.0, np.float32)
        jitter = np.zeros((2, 3))
    else:
        shift = rng.uniform(-0.1, 0.1, size=2)
        scale, angle, gain = rng.uniform(0.85, 1.15), np.deg2rad(rng.uniform(-15, 15)), rng.uniform(0.8, 1.2)
        bg0 = rng.uniform(30, 225, size=3)
        bg1 = np.clip(bg0 + rng.normal(0, 40, size=3), 0, 255)
        a = rng.uniform(0, 2 * np.pi)
        t = ((np.cos(a) * x + np.sin(a) * y) + 1) / 2
        bg = (bg0 * (1 - t[..., None]) + bg1 * t[..., None]).astype(np.float32)
        jitter = rng.normal(0, 15, size=(2, 3))
    # image -> shape frame: undo shift, rotation and scale
    dx, dy = x - shift[0], y - shift[1]
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) / scale
    v = (-s * dx + c * dy) / scale
    if params["mirror"]:
        u = -u
    rho = np.hypot(u, v) + 1e-6
    # cos(k phi) + i sin(k phi) = ((u + iv) / rho)^k: powers, not 2 x HARMONICS trig calls per pixel
    z = (u + 1j * v) / rho
    zk, wave = z, np.zeros_like(rho)
    for a, b in params["coef"]:
        wave += a * zk.real + b * zk.imag
        zk = zk * z
    radius = 0.3 * (1 + wave)
    inside = 1 / (1 + np.exp((rho - radius) * size * 1.5))  # a soft edge ~1 px wide
    grating = 0.5 + 0.5 * np.sin(2 * np.pi * params["freq"] * size
                                 * (np.cos(params["theta"]) * u + np.sin(params["theta"]) * v) + params["phase"])
    colours = np.clip(params["colours"] + jitter, 0, 255)
    fill = colours[0] * (1 - grating[..., None]) + colours[1] * grating[..., None]
    dot = np.exp(-((u - params["dot"][0] * radius) ** 2 + (v - params["dot"][1] * radius) ** 2) / (2 * 0.035 ** 2))
    fill = fill * (1 - dot[..., None]) + (255 - colours[0]) * dot[..., None]
    img = bg * (1 - inside[..., None]) + fill * inside[..., None]
    if rng is not None:
        img = img * gain + rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_class_params(num_classes: int, seed: int = 0, family_size: int = 4) -> list[dict]:
    """The parameters of every class (what :func:`render_shape` draws), deterministic for a seed.

    Every odd class is the mirror twin of the class before it. Raises LayoutError for fewer
    than 2 classes or a ``family_size`` that is not a positive even number.
    """
    if num_classes < 2:
        raise LayoutError("synthetic_shapes layout needs --num-classes >= 2")
    if family_size < 2 or family_size % 2:
        raise LayoutError(f"synthetic_shapes: family_size must be an even number >= 2 (mirror twins), got {family_size}")
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for c in range(num_classes):
        if c % family_size == 0:
            coef = np.zeros((HARMONICS, 2))
            coef[:2] = rng.normal(0, 0.18, size=(2, 2))
            coef[2:] = rng.normal(0, 0.07, size=(HARMONICS - 2, 2))
            family = {"coef": coef, "colours": rng.uniform(20, 235, size=(2, 3))}
        out.append(_mirrored(out[-1]) if c % 2 else _class_params(rng, family))
    return out


def synthetic_shape_classes(num_classes: int, images_per_class: tuple[int, int] = (30, 60), image_size: int = 64,
                            seed: int = 0, family_size: int = 4) -> list[ClassItems]:
    """Generate ``num_classes`` identities, each with a number of JPEG images drawn uniformly from
    ``images_per_class`` = (lo, hi), both included. Deterministic for a seed.

    Returns identities named ``s00000``, ``s00001``, ... with images ``<identity>_<nnnn>``.
    Raises LayoutError for fewer than 2 classes or an empty or negative size range.
    """
    from PIL import Image

    lo, hi = images_per_class
    if lo < 1 or hi < lo:
        raise LayoutError(f"synthetic_shapes: --images-per-class must be N or LO-HI with 1 <= LO <= HI, got {lo}-{hi}")
    params = shape_class_params(num_classes, seed, family_size)
    rng = np.random.default_rng([seed, 1])  # the images' own stream: class params do not depend on image counts
    out = []
    for c, p in enumerate(params):
        items = ClassItems(f"s{c:05d}")
        for i in range(int(rng.integers(lo, hi + 1))):
            buf = io.BytesIO()
            Image.fromarray(render_shape(p, image_size, rng)).save(buf, format="JPEG", quality=90)
            items.images.append(buf.getvalue())
            items.keys.append(f"{items.name}_{i:04d}")
        out.append(items)
    return out
