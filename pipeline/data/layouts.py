"""Source data-set layouts read by ``jobs.make_shards``.

A layout yields :class:`ClassItems`: one identity with the images that belong to it,
as file paths or as in-memory JPEG bytes, plus optional per-image integer labels
(``extras``, e.g. VehicleID's vehicle model and colour). The shard writer never looks at
layouts.

Layouts of the seeds' data sets (``scan_webface``, ``scan_vehicleid``, ``scan_lfw``)
return a :class:`Scan`, which also says which classes are fixed to the held-out split
(VehicleID: the test lists' vehicles; LFW: every person) and which files the shard set
should carry along for evaluation (LFW ``pairs.txt``, VehicleID test lists).
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
    extras: dict[str, list[int]] = field(default_factory=dict)
    """Optional per-image integer labels, one list per field, aligned with ``images``
    (VehicleID: ``model`` and ``color``, -1 = unknown). Written as ``<key>.<field>``."""

    def subset(self, sl: slice) -> ClassItems:
        """Return the same identity restricted to ``images[sl]`` (keys and extras sliced alike)."""
        return ClassItems(self.name, self.images[sl], self.keys[sl], {f: v[sl] for f, v in self.extras.items()})


@dataclass
class Scan:
    """What a data-set layout found: identities, non-fatal problems, fixed splits, files to copy."""

    classes: list[ClassItems]
    """Identities with at least one image."""
    problems: list[str] = field(default_factory=list)
    """Things skipped without stopping the scan, each naming the path (and list file line)."""
    holdout: set[str] | None = None
    """Names of the classes that form the held-out split; None = a random fraction (``--holdout-fraction``)."""
    copy_files: dict[str, Path] = field(default_factory=dict)
    """Files to copy next to the shards for evaluation: name under OUT -> source path."""


class LayoutError(ValueError):
    """The source tree does not have the expected layout (names the path)."""


def scan_imagefolder(root: str | Path) -> tuple[list[ClassItems], list[str]]:
    """Read an image-folder tree: ``ROOT/<identity>/<image>.jpg`` (the CASIA-WebFace layout).

    Returns the identities (sorted by name; images sorted by file name) and a list of
    problems found that did not stop the scan (empty class folders, files that are not
    images, links to missing files). Raises :class:`LayoutError` when ``root`` is missing, not a directory, or
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
            elif f.is_symlink():  # a link whose target is gone: is_file() and is_dir() are both False
                problems.append(f"missing image (dangling link, skipped): {f}")
        if not imgs:
            problems.append(f"empty class folder (skipped): {d}")
            continue
        classes.append(ClassItems(d.name, imgs, keys))
    stray = [p for p in root.iterdir() if p.is_file()]
    problems += [f"file outside a class folder (skipped): {p}" for p in sorted(stray)]
    if not classes:
        raise LayoutError(f"source folder '{root}' holds no class folder with images (expected ROOT/<identity>/<image>.jpg)")
    return classes, problems


def scan_webface(root: str | Path) -> Scan:
    """Read CASIA-WebFace: ``ROOT/<identity id>/<nnn>.jpg`` (the image-folder layout, named).

    Returns a :class:`Scan` with a random held-out fraction (``holdout`` None). Raises
    :class:`LayoutError` like :func:`scan_imagefolder`.
    """
    classes, problems = scan_imagefolder(root)
    return Scan(classes, problems)


LFW_PAIRS = "pairs.txt"


def scan_lfw(root: str | Path) -> Scan:
    """Read LFW: ``ROOT/<person>/<person>_<nnnn>.jpg`` plus ``pairs.txt`` for verification.

    Every person goes to the held-out split (LFW is an evaluation set). ``pairs.txt`` is
    looked for in ROOT, then beside it (the LFW download puts it next to ``lfw/``); when
    found it is parsed (a malformed line raises ValueError naming the file and line) and
    copied next to the shards, and every image a pair names but the tree lacks is listed in
    the problems. Text files in ROOT (the LFW metadata) are not reported as strays.
    Raises :class:`LayoutError` like :func:`scan_imagefolder`.
    """
    from pipeline.data.pairs import read_lfw_pairs  # the one parser of pairs.txt

    root = Path(root)
    classes, problems = scan_imagefolder(root)
    problems = [q for q in problems if not (q.startswith("file outside a class folder") and q.endswith(".txt"))]
    scan = Scan(classes, problems, holdout={c.name for c in classes})
    pairs = next((p for p in (root / LFW_PAIRS, root.parent / LFW_PAIRS) if p.is_file()), None)
    if pairs is None:
        scan.problems.append(f"no {LFW_PAIRS} in '{root}' or beside it: verification needs one (--pairs)")
        return scan
    have = {k for c in classes for k in c.keys}
    missing = sorted({k.split("/")[-1] for p in read_lfw_pairs(pairs) for k in (p.left, p.right)} - have)
    scan.problems += [f"image named in {pairs} is not in the tree: {root / k.rsplit('_', 1)[0] / k}.jpg"
                      for k in missing]
    scan.copy_files[LFW_PAIRS] = pairs
    return scan


def _read_id_pairs(path: Path, what: str) -> list[tuple[int, str, int]]:
    """Parse lines ``<token> <integer>`` into ``(line number, token, integer)``; blank lines skipped.

    Raises :class:`LayoutError` naming the file and line for any other line, and when the
    file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutError(f"cannot read {path}: {e}") from None
    out = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 2 or not tokens[1].isdigit():
            raise LayoutError(f"{path}:{line_no}: expected '{what}', got {line.strip()!r}")
        out.append((line_no, tokens[0], int(tokens[1])))
    return out


def _read_attr(path: Path, what: str, problems: list[str]) -> dict[int, int]:
    """``<vehicle id> <attribute id>`` lines -> {vehicle: attribute}; a missing file is a problem, not an error."""
    if not path.is_file():
        problems.append(f"no {path}: every {what} label is -1 (unknown)")
        return {}
    out: dict[int, tuple[int, int]] = {}
    for line_no, vid, value in _read_id_pairs(path, f"<vehicle id> <{what} id>"):
        if not vid.isdigit():
            raise LayoutError(f"{path}:{line_no}: vehicle id must be an integer, got {vid!r}")
        prev = out.setdefault(int(vid), (value, line_no))
        if prev[0] != value:
            raise LayoutError(f"{path}:{line_no}: vehicle {vid} has {what} {value} here "
                              f"but {prev[0]} on line {prev[1]}")
    return {v: a for v, (a, _) in out.items()}


def _test_list_size(p: Path) -> int:
    tail = p.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 1 << 62


def scan_vehicleid(root: str | Path) -> Scan:
    """Read PKU VehicleID (Liu et al., CVPR 2016).

    Layout: ``ROOT/image/<name>.jpg``; ``ROOT/train_test_split/train_list.txt`` and
    ``test_list_{800,...,13164}.txt`` with lines ``<image name> <vehicle id>``;
    ``ROOT/attribute/model_attr.txt`` (``<vehicle id> <model id>``, only some vehicles)
    and ``color_attr.txt`` (``<vehicle id> <color id>``).

    Classes are vehicles (named by the id, zero-padded to 5 digits), images keyed by file
    stem, with per-image ``model`` and ``color`` extras (-1 = unknown). The train list's
    vehicles form the train split; the union of all test lists (nested in the release, so
    each image is stored once) forms the held-out split, and the test lists are copied next
    to the shards (``OUT/test_list_800.txt``, ...), so ``jobs.evaluate --protocol vehicleid
    --test-list OUT/test_list_800.txt --data OUT/holdout`` picks its rows by stem.
    A list entry whose image file is missing is reported by path (with list and line) and
    skipped. Raises :class:`LayoutError` when ROOT, ``image/`` or ``train_list.txt`` is
    missing, for a malformed line (file and line named), when one image is listed with two
    different vehicle ids, or when no listed image exists.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"VehicleID root '{root}' does not exist or is not a directory")
    img_dir, split_dir, attr_dir = root / "image", root / "train_test_split", root / "attribute"
    train_list = split_dir / "train_list.txt"
    for need in (img_dir, train_list):
        if not need.exists():
            raise LayoutError(f"VehicleID layout: '{need}' does not exist (expected ROOT/image/ and "
                              "ROOT/train_test_split/train_list.txt)")
    problems: list[str] = []
    test_lists = sorted(split_dir.glob("test_list_*.txt"), key=_test_list_size)
    if not test_lists:
        problems.append(f"no test_list_*.txt in {split_dir}: the held-out split is empty")
    models = _read_attr(attr_dir / "model_attr.txt", "model", problems)
    colors = _read_attr(attr_dir / "color_attr.txt", "color", problems)
    on_disk = {p.name for p in img_dir.iterdir()}  # one listing instead of 221k stat calls

    where: dict[str, tuple[int, Path, int]] = {}  # image name -> (vehicle, list, line)
    per_vehicle: dict[int, dict[str, Path]] = {}
    held: set[int] = set()
    for lst in [train_list, *test_lists]:
        for line_no, name, vid in _read_id_pairs(lst, "<image name> <vehicle id>"):
            prev = where.setdefault(name, (vid, lst, line_no))
            if prev[0] != vid:
                raise LayoutError(f"{lst}:{line_no}: image {name} is listed as vehicle {vid}, "
                                  f"but as vehicle {prev[0]} in {prev[1]}:{prev[2]}")
            if lst is not train_list:
                held.add(vid)
            if prev[1] is not lst:
                continue  # listed again (the test lists are nested): stored once
            file = name if Path(name).suffix.lower() in IMAGE_SUFFIXES else f"{name}.jpg"
            if file not in on_disk:
                problems.append(f"missing image (skipped): {img_dir / file} (listed in {lst}:{line_no})")
                continue
            per_vehicle.setdefault(vid, {})[Path(file).stem] = img_dir / file
    train_vids = {vid for vid, lst, _ in where.values() if lst is train_list}
    for vid in sorted(train_vids & held):
        problems.append(f"vehicle {vid} is in {train_list} and in a test list: kept in the held-out split only")
    classes = []
    for vid in sorted(per_vehicle):
        imgs = per_vehicle[vid]
        keys = sorted(imgs)
        n = len(keys)
        extras = {"model": [models.get(vid, -1)] * n, "color": [colors.get(vid, -1)] * n}
        classes.append(ClassItems(f"{vid:05d}", [imgs[k] for k in keys], keys, extras))
    if not classes:
        raise LayoutError(f"VehicleID layout: none of the images listed in {split_dir} exists in {img_dir}")
    holdout = {c.name for c in classes if int(c.name) in held}  # a vehicle with no image left has no class
    return Scan(classes, problems, holdout=holdout, copy_files={p.name: p for p in test_lists})


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
