"""Source layouts: the image-folder scan and the synthetic look-alike identities."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.layouts import LayoutError, scan_imagefolder, synthetic_classes


def _jpeg(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format="JPEG")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    for name, n in [("bob", 3), ("alice", 2), ("carol", 1)]:
        for i in range(n):
            _jpeg(root / name / f"img{i}.jpg", 10 * i)
    (root / "empty_id").mkdir()
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "README").write_text("stray file")
    return root


def test_scan_imagefolder_classes_and_counts(tree):
    classes, problems = scan_imagefolder(tree)
    assert [c.name for c in classes] == ["alice", "bob", "carol"]
    assert [len(c.images) for c in classes] == [2, 3, 1]
    bob = classes[1]
    assert bob.keys == ["img0", "img1", "img2"]
    assert bob.images == [tree / "bob" / f"img{i}.jpg" for i in range(3)]
    assert len(problems) == 3
    assert any("empty class folder" in q and str(tree / "empty_id") in q for q in problems)
    assert any("not an image" in q and str(tree / "alice" / "notes.txt") in q for q in problems)
    assert any("outside a class folder" in q and str(tree / "README") in q for q in problems)


def test_scan_imagefolder_accepts_other_suffixes(tmp_path):
    root = tmp_path / "src"
    root.joinpath("a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "a" / "x.PNG", format="PNG")
    Image.new("RGB", (4, 4)).save(root / "a" / "y.jpeg", format="JPEG")
    classes, problems = scan_imagefolder(str(root))
    assert [c.keys for c in classes] == [["x", "y"]] and problems == []


def test_scan_missing_root_names_path(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(LayoutError, match="does_not_exist"):
        scan_imagefolder(missing)


def test_scan_root_is_a_file(tmp_path):
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(LayoutError, match="not a directory"):
        scan_imagefolder(f)


def test_scan_root_without_class_folders(tmp_path):
    root = tmp_path / "flat"
    _jpeg(root / "a.jpg", 0)
    (root / "empty").mkdir()
    with pytest.raises(LayoutError, match="no class folder"):
        scan_imagefolder(root)


def _decode(b: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(b)) as im:
        assert im.format == "JPEG"
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def test_synthetic_deterministic_and_shaped():
    a = synthetic_classes(5, 3, image_size=24, seed=7)
    b = synthetic_classes(5, 3, image_size=24, seed=7)
    c = synthetic_classes(5, 3, image_size=24, seed=8)
    assert [x.name for x in a] == [f"c{i:05d}" for i in range(5)]
    assert all(len(x.images) == 3 and x.keys == [f"{x.name}_{i:04d}" for i in range(3)] for x in a)
    assert [x.images for x in a] == [x.images for x in b]
    assert all(i1 != i2 for x, y in zip(a, c) for i1, i2 in zip(x.images, y.images))
    for x in a:
        for img in x.images:
            assert isinstance(img, bytes) and _decode(img).shape == (24, 24, 3)


def test_synthetic_rejects_tiny_requests():
    with pytest.raises(LayoutError):
        synthetic_classes(1, 3)
    with pytest.raises(LayoutError):
        synthetic_classes(4, 0)


def test_synthetic_families_are_look_alikes():
    # 4 families of 4 classes; the class-mean image averages out per-image nuisance.
    classes = synthetic_classes(16, 12, image_size=32, seed=0, family_size=4)
    means = np.stack([np.mean([_decode(b) for b in c.images], axis=0).ravel() for c in classes])
    d = np.sqrt(((means[:, None] - means[None]) ** 2).mean(-1))
    fam = np.arange(16) // 4
    same = fam[:, None] == fam[None]
    off_diag = ~np.eye(16, dtype=bool)
    within = d[same & off_diag].mean()
    between = d[~same].mean()
    assert within < 0.8 * between
