"""Class-grouped WebDataset shards: grouping, splits, manifest, bad images, resume, lookup."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.layouts import ClassItems, scan_imagefolder, synthetic_classes
from pipeline.data.manifest import MANIFEST, ShardError, find_manifest, list_shards
from pipeline.data.shards import write_shards


def _write(classes, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return write_shards(classes, out, **kw)


def _tar_samples(path: Path) -> list[tuple[str, int, bytes]]:
    """(key, class id, jpg bytes) per sample in tar order, checking each has exactly .jpg + .cls."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert len(members) % 2 == 0
    out = []
    for (n1, jpg), (n2, cls) in zip(members[::2], members[1::2]):
        k1, ext1 = n1.split(".", 1)
        k2, ext2 = n2.split(".", 1)
        assert (k1, ext1, ext2) == (k2, "jpg", "cls")
        out.append((k1, int(cls.decode("ascii")), jpg))
    return out


def _runs(labels: list[int]) -> list[int]:
    """Classes in order of their runs of consecutive equal labels."""
    return [c for i, c in enumerate(labels) if i == 0 or labels[i - 1] != c]


def _decode(b: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(b)) as im:
        assert im.format == "JPEG"
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    classes = synthetic_classes(10, 5, image_size=16, seed=3)
    out = tmp_path_factory.mktemp("synth")
    manifest = _write(classes, out, holdout_fraction=0.3, shard_size=12, seed=1)
    return classes, out, manifest


def test_classes_contiguous_in_one_shard(synth):
    classes, out, manifest = synth
    where: dict[int, list[str]] = {}
    for s in manifest["shards"]:
        samples = _tar_samples(out / s["path"])
        labels = [cid for _, cid, _ in samples]
        runs = _runs(labels)
        assert len(runs) == len(set(runs)), f"{s['path']}: a class is split inside the shard"
        assert len(samples) <= 12
        for cid in runs:
            where.setdefault(cid, []).append(s["path"])
        # Each key starts with its class id (7 digits) and the .cls matches it.
        assert all(key.startswith(f"{cid:07d}_") for key, cid, _ in samples)
    assert sorted(where) == list(range(10))
    assert all(len(paths) == 1 for paths in where.values())


def test_splits_disjoint_and_fraction(synth):
    classes, out, manifest = synth
    by_split = {"train": set(), "holdout": set()}
    for s in manifest["shards"]:
        assert s["path"].startswith(s["split"] + "/")
        by_split[s["split"]] |= {cid for _, cid, _ in _tar_samples(out / s["path"])}
    assert by_split["train"].isdisjoint(by_split["holdout"])
    assert by_split["train"] | by_split["holdout"] == set(range(10))
    assert len(by_split["holdout"]) == round(10 * 0.3)
    assert {c["id"] for c in manifest["classes"] if c["split"] == "holdout"} == by_split["holdout"]


def test_manifest_content(synth):
    classes, out, manifest = synth
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["format"] == "dml-pipeline/shards-v1" and manifest["seed"] == 1
    assert manifest["holdout_fraction"] == 0.3 and manifest["problems"] == []
    assert [(c["id"], c["name"], c["count"]) for c in manifest["classes"]] == [(i, f"c{i:05d}", 5) for i in range(10)]
    for c in manifest["classes"]:
        (path,) = c["shards"]
        assert path.startswith(c["split"] + "/")
        assert c["id"] in {cid for _, cid, _ in _tar_samples(out / path)}
    for s in manifest["shards"]:
        assert s["sha256"] == hashlib.sha256((out / s["path"]).read_bytes()).hexdigest()
        samples = _tar_samples(out / s["path"])
        assert s["count"] == len(samples)
        assert s["classes"] == sorted({cid for _, cid, _ in samples})
        assert s["counts"] == {str(cid): sum(1 for _, c, _ in samples if c == cid) for cid in s["classes"]}
    for split, n_cls in [("train", 7), ("holdout", 3)]:
        tot = manifest["splits"][split]
        assert tot["classes"] == n_cls and tot["images"] == 5 * n_cls
        assert tot["shards"] == sum(1 for s in manifest["shards"] if s["split"] == split)
        assert tot["shards"] == len(list((out / split).glob("*.tar")))


def test_jpeg_bytes_pass_through(synth):
    classes, out, manifest = synth
    got = {key: jpg for s in manifest["shards"] for key, _, jpg in _tar_samples(out / s["path"])}
    want = {f"{cid:07d}_{k}": b for cid, c in enumerate(classes) for k, b in zip(c.keys, c.images)}
    assert got == want


def test_readable_by_webdataset(synth):
    import webdataset as wds

    classes, out, manifest = synth
    paths = [str(out / s["path"]) for s in manifest["shards"] if s["split"] == "train"]
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert len(samples) == manifest["splits"]["train"]["images"]
    labels = [int(s["cls"]) for s in samples]
    assert sorted(set(labels)) == [c["id"] for c in manifest["classes"] if c["split"] == "train"]
    assert len(_runs(labels)) == len(set(labels))  # still grouped when read back
    for s in samples:
        assert set(s) >= {"__key__", "jpg", "cls"}
        assert s["__key__"].startswith(f"{int(s['cls']):07d}_")
        assert _decode(s["jpg"]).shape == (16, 16, 3)


def test_deterministic_bytes(synth, tmp_path):
    classes, out, manifest = synth
    again = _write(classes, tmp_path / "again", holdout_fraction=0.3, shard_size=12, seed=1)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_holdout_depends_on_seed(tmp_path):
    classes = synthetic_classes(20, 1, image_size=16, seed=0)
    hold = [
        {c["id"] for c in _write(classes, tmp_path / str(seed), seed=seed)["classes"] if c["split"] == "holdout"}
        for seed in (0, 1)
    ]
    assert len(hold[0]) == len(hold[1]) == 10 and hold[0] != hold[1]


def test_no_holdout(tmp_path):
    m = _write(synthetic_classes(4, 2, image_size=16), tmp_path, holdout_fraction=0.0)
    assert m["splits"]["holdout"] == {"classes": 0, "images": 0, "shards": 0}
    assert m["splits"]["train"]["classes"] == 4


def test_a_validation_split_comes_out_of_train_and_leaves_holdout_and_order_alone(synth, tmp_path):
    classes, out, manifest = synth
    with_val = _write(classes, tmp_path, holdout_fraction=0.3, shard_size=12, seed=1, exemplars=1, val_fraction=0.3)
    split = {c["id"]: c["split"] for c in with_val["classes"]}
    before = {c["id"]: c["split"] for c in manifest["classes"]}
    assert {c for c, s in split.items() if s == "holdout"} == {c for c, s in before.items() if s == "holdout"}
    val = {c for c, s in split.items() if s == "val"}
    assert len(val) == round(7 * 0.3) and all(before[c] == "train" for c in val)
    read = {s["split"]: set() for s in with_val["shards"]}
    for s in with_val["shards"]:
        read[s["split"]] |= {cid for _, cid, _ in _tar_samples(tmp_path / s["path"])}
    assert read["val"] == val and read["train"] == {c for c, s in split.items() if s == "train"}
    assert with_val["splits"]["val"] == {"classes": 2, "images": 10, "shards": 1}
    assert with_val["val_fraction"] == 0.3 and "val" not in manifest["splits"]
    assert with_val["splits"]["exemplars"]["classes"] == 5  # the miner's exemplars: train classes only
    from pipeline.data.index import load_index

    index = load_index(tmp_path, "val", verify=True)
    assert len(index) == 10 and set(index.label.tolist()) == val


def test_a_validation_split_must_leave_two_training_classes(tmp_path):
    with pytest.raises(ValueError, match="--val-fraction 0.9 leaves 0 of 4 classes"):
        _write(synthetic_classes(8, 2, image_size=16), tmp_path, val_fraction=0.9)
    with pytest.raises(ValueError, match=r"--val-fraction must be in \[0, 1\)"):
        _write(synthetic_classes(8, 2, image_size=16), tmp_path, val_fraction=1.0)


@pytest.mark.parametrize("kw", [{"holdout_fraction": 1.0}, {"holdout_fraction": -0.1}, {"shard_size": 1}])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        _write(synthetic_classes(4, 2, image_size=16), tmp_path, **kw)


def test_big_class_gets_own_shards_in_whole_pairs(tmp_path):
    imgs = synthetic_classes(4, 9, image_size=16)
    classes = [
        ClassItems("a_small", imgs[0].images[:3], imgs[0].keys[:3]),
        ClassItems("b_big", imgs[1].images, imgs[1].keys),
        ClassItems("c_small", imgs[2].images[:2], imgs[2].keys[:2]),
        ClassItems("d_small", imgs[3].images[:2], imgs[3].keys[:2]),
    ]
    m = _write(classes, tmp_path, holdout_fraction=0.0, shard_size=5)
    big = m["classes"][1]
    assert big["name"] == "b_big" and big["count"] == 9 and len(big["shards"]) == 3
    counts = []
    for path in big["shards"]:
        labels = [cid for _, cid, _ in _tar_samples(tmp_path / path)]
        assert set(labels) == {1}, "a big class's shards hold nothing else"
        counts.append(len(labels))
    assert counts == [4, 4, 1]  # shard_size 5 -> chunks of 4 (whole pairs)
    keys = [k for p in big["shards"] for k, _, _ in _tar_samples(tmp_path / p)]
    assert keys == [f"0000001_{k}" for k in imgs[1].keys]
    # The small classes share shards and are still in exactly one each.
    for c in (m["classes"][0], m["classes"][2], m["classes"][3]):
        assert len(c["shards"]) == 1 and c["shards"][0] not in big["shards"]


def _png(path: Path, seed: int, size: int = 32) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return arr


def _jpg(path: Path, seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def bad_tree(tmp_path):
    root = tmp_path / "src"
    good = {}
    for ci, name in enumerate(["ann", "ben", "cat"]):
        for i in range(3):
            good[(name, f"im{i}")] = _jpg(root / name / f"im{i}.jpg", 10 * ci + i)
    _png(root / "ann" / "im9.png", 99)
    good[("ann", "im9")] = None  # re-encoded: compared by decoding
    (root / "ben" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    full = _jpg(tmp_path / "whole.jpg", 5, size=64)
    (root / "cat" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "empty").mkdir()
    return root, good


def test_imagefolder_bad_images_reported_and_good_kept(bad_tree, tmp_path):
    root, good = bad_tree
    classes, problems = scan_imagefolder(root)
    out = tmp_path / "out"
    m = _write(classes, out, holdout_fraction=0.0, shard_size=100, problems=problems)
    assert m["problems"][: len(problems)] == problems
    assert any(str(root / "empty") in q for q in m["problems"])
    bad = m["problems"][len(problems):]
    assert len(bad) == 2
    assert any(str(root / "ben" / "corrupt.jpg") in q for q in bad)
    assert any(str(root / "cat" / "truncated.jpg") in q for q in bad)
    assert [(c["name"], c["count"]) for c in m["classes"]] == [("ann", 4), ("ben", 3), ("cat", 3)]
    got = {key: jpg for s in m["shards"] for key, _, jpg in _tar_samples(out / s["path"])}
    names = [c["name"] for c in m["classes"]]
    assert len(got) == len(good) == 10
    for (name, stem), data in good.items():
        key = f"{names.index(name):07d}_{stem}"
        if data is not None:
            assert got[key] == data  # JPEGs are copied byte for byte
        else:
            arr = _decode(got[key])  # the PNG became a decodable JPEG of the same size
            assert arr.shape == (32, 32, 3)


def test_same_stem_different_suffix_gives_distinct_samples(tmp_path):
    import webdataset as wds

    root = tmp_path / "src"
    a = _jpg(root / "p" / "x.jpg", 1)
    _png(root / "p" / "x.png", 2)
    _jpg(root / "p" / "x.y.jpg", 3)
    _jpg(root / "p" / "x_y.jpg", 4)
    _jpg(root / "q" / "z.jpg", 5)
    _jpg(root / "q" / "w.jpg", 6)
    classes, _ = scan_imagefolder(root)
    out = tmp_path / "out"
    m = _write(classes, out, holdout_fraction=0.0)
    assert m["classes"][0]["count"] == 4
    samples = list(wds.WebDataset([str(out / s["path"]) for s in m["shards"]], shardshuffle=False))
    assert len(samples) == 6 and len({s["__key__"] for s in samples}) == 6
    assert sum(s["jpg"] == a for s in samples) == 1


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_resume_keeps_good_shards_and_rewrites_bad_ones(tmp_path):
    classes = synthetic_classes(8, 3, image_size=16, seed=2)
    out = tmp_path / "out"
    m1 = _write(classes, out, holdout_fraction=0.5, shard_size=6)
    paths = [s["path"] for s in m1["shards"]]
    assert len(paths) >= 4
    before = {p: _stat(out / p) for p in paths}

    m2 = _write(classes, out, holdout_fraction=0.5, shard_size=6)
    assert m2 == m1
    assert {p: _stat(out / p) for p in paths} == before  # nothing was rewritten

    deleted, corrupted = paths[0], paths[-1]
    (out / deleted).unlink()
    with open(out / corrupted, "r+b") as f:
        f.seek(600)
        f.write(b"garbage")
    m3 = _write(classes, out, holdout_fraction=0.5, shard_size=6)
    assert m3 == m1
    after = {p: _stat(out / p) for p in paths}
    for p in paths:
        assert (after[p] == before[p]) == (p not in (deleted, corrupted)), p
        assert hashlib.sha256((out / p).read_bytes()).hexdigest() == m1["shards"][paths.index(p)]["sha256"]
    assert not list(out.rglob("*.tmp"))


def test_resume_rewrites_when_plan_changes(tmp_path):
    classes = synthetic_classes(6, 2, image_size=16)
    out = tmp_path / "out"
    _write(classes, out, holdout_fraction=0.0, shard_size=4)
    m = _write(classes, out, holdout_fraction=0.0, shard_size=6)  # same paths, different class sets
    for s in m["shards"]:
        assert s["classes"] == sorted({cid for _, cid, _ in _tar_samples(out / s["path"])})
    assert [len(s["classes"]) for s in m["shards"]] == [3, 3]


def test_resume_keeps_problems(bad_tree, tmp_path):
    root, _ = bad_tree
    classes, problems = scan_imagefolder(root)
    out = tmp_path / "out"
    m1 = _write(classes, out, holdout_fraction=0.0, problems=problems)
    m2 = _write(classes, out, holdout_fraction=0.0, problems=problems)
    assert m2["problems"] == m1["problems"] and len(m1["problems"]) == len(problems) + 2


def test_corrupt_manifest_is_ignored(tmp_path):
    classes = synthetic_classes(4, 2, image_size=16)
    m1 = _write(classes, tmp_path, holdout_fraction=0.5)
    (tmp_path / MANIFEST).write_text("{not json")
    assert _write(classes, tmp_path, holdout_fraction=0.5) == m1


def test_list_shards(synth):
    _, out, manifest = synth
    train = sorted(str(out / s["path"]) for s in manifest["shards"] if s["split"] == "train")
    everything = sorted(str(out / s["path"]) for s in manifest["shards"])
    assert list_shards(str(out / "train")) == (train, None)
    assert list_shards(str(out)) == (everything, None)
    assert list_shards(str(out / "train" / "*.tar")) == (train, None)
    assert list_shards(train[0]) == ([train[0]], None)


@pytest.mark.parametrize("spec", ["nowhere/*.tar", "missing_dir"])
def test_list_shards_no_match_names_spec(tmp_path, spec):
    full = str(tmp_path / spec)
    with pytest.raises(ShardError) as e:
        list_shards(full)
    assert full in str(e.value)


def test_list_shards_empty_dir_and_empty_spec(tmp_path):
    with pytest.raises(ShardError, match=str(tmp_path)):
        list_shards(str(tmp_path))
    with pytest.raises(ShardError, match="data.train"):
        list_shards("")


def test_find_manifest(synth, tmp_path):
    _, out, manifest = synth
    first = manifest["shards"][0]["path"]
    for spec in [out, out / "train", out / "holdout", out / "train" / "*.tar", out / first]:
        assert find_manifest(str(spec)) == manifest, spec
    assert find_manifest(str(tmp_path)) is None  # URIs: tests/data/test_cache.py (a real S3 API)


def _class_order(out: Path, manifest: dict, split: str) -> list[int]:
    """Class ids in the order they are read: shard by shard (manifest order), runs in tar order."""
    labels = [cid for s in manifest["shards"] if s["split"] == split for _, cid, _ in _tar_samples(out / s["path"])]
    return _runs(labels)


def test_classes_fill_shards_in_a_seeded_random_order(tmp_path):
    classes = synthetic_classes(40, 2, image_size=16, seed=0)
    orders = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        m = _write(classes, tmp_path / name, holdout_fraction=0.25, shard_size=6, seed=seed)
        order = _class_order(tmp_path / name, m, "train")
        assert sorted(order) == sorted(c["id"] for c in m["classes"] if c["split"] == "train")
        assert order != sorted(order), "classes are not in name (= id) order across shards"
        assert order == [c for s in m["shards"] if s["split"] == "train" for c in s["class_order"]]
        held = _class_order(tmp_path / name, m, "holdout")
        assert held != sorted(held) and len(held) == 10
        orders[name] = (order, held)
    assert orders["a"] == orders["b"], "reproducible for a seed"
    assert orders["a"][0] != orders["c"][0]
    # Ids are still the name order, and the holdout draw is what it was before shuffling existed.
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert [c["name"] for c in m["classes"]] == [f"c{i:05d}" for i in range(40)]
    want_hold = set(np.random.default_rng(5).permutation(40)[:10].tolist())
    assert {c["id"] for c in m["classes"] if c["split"] == "holdout"} == want_hold


def test_resume_rewrites_shards_written_in_another_class_order(tmp_path):
    classes = synthetic_classes(4, 2, image_size=16)
    m1 = _write(classes, tmp_path, holdout_fraction=0.0, shard_size=100, seed=0)
    assert len(m1["shards"]) == 1  # one shard holds every class
    seeds = [s for s in range(1, 20) if np.random.default_rng([s, 1]).permutation(4).tolist()
             != np.random.default_rng([0, 1]).permutation(4).tolist()]
    m2 = _write(classes, tmp_path, holdout_fraction=0.0, shard_size=100, seed=seeds[0])
    assert m2["shards"][0]["classes"] == m1["shards"][0]["classes"]  # same class set in the same path...
    assert m2["shards"][0]["class_order"] != m1["shards"][0]["class_order"]  # ...in another order: rewritten
    assert _class_order(tmp_path, m2, "train") == m2["shards"][0]["class_order"]
