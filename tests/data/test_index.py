"""The per-sample index: rows read back each sample's exact bytes, classes are ranges, stale is refused."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.index import SampleIndex, build_index, class_ranges, load_index, read_samples
from pipeline.data.layouts import ClassItems, synthetic_classes
from pipeline.data.manifest import ShardError
from pipeline.data.shards import write_shards


def _classes() -> list[ClassItems]:
    """12 classes of 1-5 images (one of 9: bigger than a shard), with VehicleID-like extras."""
    base = synthetic_classes(12, 9, image_size=16, seed=4)
    out = []
    for i, c in enumerate(base):
        n = 9 if i == 5 else 1 + i % 5
        out.append(ClassItems(c.name, c.images[:n], c.keys[:n],
                              {"color": [i % 3] * n, "model": [100 * i + k for k in range(n)]}))
    return out


def _write(out: Path, **kw) -> dict:
    kw = {"holdout_fraction": 0.25, "shard_size": 6, "seed": 7, "workers": 1, "progress": False,
          "exemplars": 2} | kw
    return write_shards(_classes(), out, **kw)


def _tar_rows(path: Path) -> list[tuple[bytes, int, int, int]]:
    """(jpg, cls, color, model) per sample in tar order, by ``tarfile``: the slow reference."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
    keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
    return [(members[f"{k}.jpg"], int(members[f"{k}.cls"]), int(members[f"{k}.color"]), int(members[f"{k}.model"]))
            for k in keys]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed")
    return out, _write(out)


@pytest.mark.parametrize("split", ["train", "holdout", "exemplars"])
def test_rows_read_back_each_samples_exact_bytes(shard_set, split):
    out, manifest = shard_set
    index = load_index(out, split)
    entries = manifest["exemplar_shards"] if split == "exemplars" else [
        s for s in manifest["shards"] if s["split"] == split]
    want = [(si, r) for si, e in enumerate(entries) for r in _tar_rows(out / e["path"])]
    assert len(index) == len(want) == sum(e["count"] for e in entries) > 0
    assert index.paths == [str(out / e["path"]) for e in entries]
    assert index.shard.tolist() == [si for si, _ in want]
    assert index.label.tolist() == [r[1] for _, r in want]
    assert index.extras["color"].tolist() == [r[2] for _, r in want]
    assert index.extras["model"].tolist() == [r[3] for _, r in want]
    assert index.size.tolist() == [len(r[0]) for _, r in want]
    assert read_samples(index, np.arange(len(index))) == [r[0] for _, r in want]
    ids = np.random.default_rng(0).integers(0, len(index), 50)  # any order, repeats allowed
    assert read_samples(index, ids) == [want[i][1][0] for i in ids]
    assert read_samples(index, []) == []


def test_read_through_a_pyarrow_filesystem(shard_set):
    import pyarrow.fs as pafs

    out, _ = shard_set
    index = load_index(out / "train")  # OUT/<split> is accepted too
    ids = np.arange(len(index))[::-1]
    assert read_samples(index, ids, filesystem=pafs.LocalFileSystem()) == read_samples(index, ids)


def test_class_ranges_are_contiguous_and_match_the_manifest(shard_set):
    out, manifest = shard_set
    index = load_index(out / "manifest.json")
    ids, starts, counts = class_ranges(index)
    train = {c["id"]: c for c in manifest["classes"] if c["split"] == "train"}
    assert sorted(ids.tolist()) == sorted(train)
    assert {int(c): int(n) for c, n in zip(ids, counts)} == {c: t["count"] for c, t in train.items()}
    assert starts[0] == 0 and (np.diff(np.append(starts, len(index))) == counts).all()
    for c, s, n in zip(ids, starts, counts):
        assert (index.label[s : s + n] == c).all()
    # The 9-image class is bigger than a shard (6): its rows run on across its own shards.
    big = ids.tolist().index(5) if 5 in train else None
    if big is not None:
        assert len({int(x) for x in index.shard[starts[big] : starts[big] + counts[big]]}) == 2
    # Not name order: the classes' rows do not come in id order.
    assert ids.tolist() != sorted(ids.tolist())


def test_class_ranges_names_a_class_that_is_not_contiguous():
    labels = np.array([3, 3, 1, 3], dtype=np.int32)
    index = SampleIndex("r", "train", ["a.tar", "b.tar"], np.array([0, 0, 0, 1], np.uint32),
                        np.zeros(4, np.uint64), np.ones(4, np.uint32), labels)
    want = r"class 3 is not contiguous.*rows from 0 \(shard a.tar\).*from 3 \(shard b.tar\)"
    with pytest.raises(ShardError, match=want):
        class_ranges(index)


def test_reindex_gives_the_index_written_with_the_shards(tmp_path):
    out = tmp_path / "s"
    _write(out)
    written = {p.name: p.read_bytes() for p in out.glob("index-*")}
    assert sorted(written) == [f"index-{s}.{x}" for s in ("exemplars", "holdout", "train") for x in ("bin", "json")]
    for p in out.glob("index-*"):
        p.unlink()
    with pytest.raises(ShardError, match="no train index.*--reindex"):
        load_index(out)
    summary = build_index(out, workers=2)
    assert [s["split"] for s in summary] == ["train", "holdout", "exemplars"]
    assert {p.name: p.read_bytes() for p in out.glob("index-*")} == written


def test_stale_index_is_refused(tmp_path):
    out = tmp_path / "s"
    _write(out)
    old = tmp_path / "old"
    old.mkdir()
    for p in out.glob("index-train.*"):
        shutil.copy(p, old / p.name)
    _write(out, seed=8)  # shards rewritten with another class order
    load_index(out)  # the new index is fine
    for p in old.iterdir():
        shutil.copy(p, out / p.name)
    with pytest.raises(ShardError, match=r"index-train.json is stale.*--reindex"):
        load_index(out)


def test_shard_changed_behind_the_manifest_is_refused_and_short_read_named(tmp_path):
    out = tmp_path / "s"
    _write(out)
    index = load_index(out)
    last = len(index) - 1
    path = Path(index.paths[int(index.shard[last])])
    size0 = path.stat().st_size
    with open(path, "r+b") as f:  # cut the last sample's JPEG short
        f.truncate(int(index.offset[last]) + 10)
    with pytest.raises(ShardError, match=rf"{path.name} changed since it was indexed.*rerun `python -m jobs"):
        load_index(out)
    cut = load_index(out, allow_cut=True)  # what the training stream opens: the cut is listed, the rest reads
    assert cut.cut == {str(path): (int(index.offset[last]) + 10, size0)}
    assert read_samples(cut, [0]) == read_samples(index, [0])
    with pytest.raises(ShardError, match=rf"{path}: short read at byte {int(index.offset[last])}: 10 of"):
        read_samples(index, [0, last])  # the index opened before the cut
    with pytest.raises(ShardError, match=rf"{path}: member at byte \d+ needs .*truncated.*make_shards"):
        build_index(out, workers=1)


def test_same_size_change_is_found_by_verify_and_reindex_refuses_it(tmp_path):
    out = tmp_path / "s"
    _write(out)
    index = load_index(out)
    path = Path(index.paths[0])
    with open(path, "r+b") as f:  # one byte of the first JPEG: same size, other bytes
        f.seek(int(index.offset[0]) + 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    load_index(out)  # the cheap checks (manifest checksums, sizes) cannot see it
    with pytest.raises(ShardError, match=rf"{path.name} changed since it was indexed"):
        load_index(out, verify=True)
    with pytest.raises(ShardError, match=rf"{path}: sha256 .* differs from the manifest's"):
        build_index(out, workers=1)  # --reindex does not bless a changed shard


def test_ids_out_of_range(shard_set):
    out, _ = shard_set
    index = load_index(out)
    with pytest.raises(IndexError, match=rf"\[0, {len(index)}\)"):
        read_samples(index, [len(index)])
