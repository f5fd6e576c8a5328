"""Bad input on the real Ray Data stream: each defect skipped and counted per reason, the good
samples kept, the run stopped (naming the file) above data.max_bad_fraction; resume skips."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.reader import decode_sample_ids, encode_sample_ids
from pipeline.data.report import REASONS, create_report, fetch_report, write_report
from pipeline.data.stream import build_train_dataset, data_metrics

CORRUPT = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3 + b"\xff\xd9"  # JPEG markers around junk: fails to decode


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]


def _write(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _samples(members) -> list[str]:
    """Sample keys in tar order."""
    keys = []
    for name, _ in members:
        k = name.split(".", 1)[0]
        if not keys or keys[-1] != k:
            keys.append(k)
    return keys


def _shards(tmp: Path, classes: int = 12, shard_size: int = 16) -> tuple[Path, list[Path]]:
    from pipeline.data.layouts import synthetic_classes
    from pipeline.data.shards import write_shards

    write_shards(synthetic_classes(classes, 8, image_size=32, seed=2), tmp, holdout_fraction=0.0,
                 shard_size=shard_size, seed=0, workers=1, progress=False)
    return tmp / "train", sorted((tmp / "train").glob("*.tar"))


def _cfg(train: Path, epochs: int = 1, max_bad: float = 1.0, pool: int = 4):
    return load_config(None, [f"data.train={train}", "data.image_size=32", "batch.classes_per_batch=2",
                              "scaling.num_workers=1", f"miner.pool_classes={pool}", f"data.epochs={epochs}",
                              "train.seed=1", f"data.max_bad_fraction={max_bad}", "data.decode_concurrency=2"])


def _run(cfg, **kw) -> list[dict]:
    return list(build_train_dataset(cfg, **kw).iter_batches(batch_size=1, batch_format="numpy"))


@pytest.fixture(scope="module")
def defect_set(tmp_path_factory):
    """6 shards of 2 classes x 8 images; every defect injected once (twice for corrupt_image / empty_shard).

    Returns (train dir, {shard index: (all sample (shard, index) pairs, bad ones)}, expected counts).
    """
    train, paths = _shards(tmp_path_factory.mktemp("defects"))
    expected = dict.fromkeys(REASONS, 0)
    bad: dict[int, set[int]] = {}

    # shard 0: two images that fail to decode (different classes); shard 5: one cut JPEG.
    m = _members(paths[0])
    keys = _samples(m)
    corrupt = {keys[1], keys[9]}
    _write(paths[0], [(n, CORRUPT if n.split(".")[0] in corrupt and n.endswith(".jpg") else d) for n, d in m])
    expected["corrupt_image"] = 2
    bad[0] = {1, 9}
    m = _members(paths[5])
    keys = _samples(m)
    _write(paths[5], [(n, d[: len(d) // 2] if n == f"{keys[4]}.jpg" else d) for n, d in m])
    expected["truncated_image"] = 1
    bad[5] = {4}

    # shard 1: a sample without .cls, a label outside the manifest.
    m = _members(paths[1])
    keys = _samples(m)
    m = [(n, d) for n, d in m if n != f"{keys[2]}.cls"]
    m = [(n, b"9999" if n == f"{keys[12]}.cls" else d) for n, d in m]
    _write(paths[1], m)
    expected["missing_label"], expected["unknown_label"] = 1, 1
    bad[1] = {2, 12}

    # shard 2: its second class keeps one image (its index is 8 after the 8 of the first class).
    m = _members(paths[2])
    keys = _samples(m)
    _write(paths[2], [(n, d) for n, d in m if n.split(".")[0] not in keys[9:]])
    expected["small_class"] = 1
    bad[2] = {8} | set(range(9, 16))  # 9 samples are left; 9..15 no longer exist

    # shard 3: cut in the middle of sample 11's image: samples 0..10 survive (second class: 3 images).
    m = _members(paths[3])
    raw = paths[3].read_bytes()
    cut = raw.find(m[22][1]) + 100  # members: .jpg then .cls per sample
    assert m[22][0].endswith(".jpg") and m[22][0].split(".")[0] == _samples(m)[11]
    paths[3].write_bytes(raw[:cut])
    expected["truncated_tar"] = 1
    bad[3] = set(range(11, 16))  # lost with the cut (not individually counted)

    # shard 4: a zero-byte file; an extra shard that is a valid tar with no member.
    paths[4].write_bytes(b"")
    _write(train / "train-000099.tar", [])
    expected["empty_shard"] = 2
    bad[4] = set(range(16))
    return train, bad, expected


def test_each_defect_is_counted_and_the_good_samples_arrive(ray_local, defect_set):
    train, bad, expected = defect_set
    name = f"report-{uuid.uuid4().hex[:8]}"
    handle = create_report(name)  # the driver's handle keeps it alive
    rows = _run(_cfg(train, max_bad=0.2), report=name)
    assert rows
    report = fetch_report(name)
    unused = np.asarray(report["unused_ids"], dtype=np.int64)
    # An image that fails to decode is found when a batch is composed around it; one left
    # in the pool at the end of the stream (unused) is never decoded, hence never counted.
    never_decoded = int(np.isin(encode_sample_ids(0, 0, [1, 9]), unused).sum())
    expected = expected | {"corrupt_image": 2 - never_decoded}
    assert report["counts"] == expected, report["counts"]
    # Samples the reader produced, bad ones included, plus one per shard-level problem.
    assert report["samples_seen"] == 16 + 16 + 9 + (11 + 1) + 1 + 16 + 1
    by_reason = {}
    for it in report["items"]:
        by_reason.setdefault(it["reason"], []).append(it)
    shard_names = sorted(p.name for p in train.glob("*.tar"))
    assert {Path(i["shard"]).name for i in by_reason["empty_shard"]} == {shard_names[4], "train-000099.tar"}
    assert Path(by_reason["truncated_tar"][0]["shard"]).name == shard_names[3]
    assert "truncated" in by_reason["truncated_tar"][0]["key"]

    arrived = np.concatenate([r["sample_ids"][0] for r in rows])
    _, shard, index = decode_sample_ids(arrived[arrived >= 0])
    got = set(zip(shard.tolist(), index.tolist()))
    _, s2, i2 = decode_sample_ids(unused)
    left = set(zip(s2.tolist(), i2.tolist()))
    assert not got & left
    # The images that failed to decode were replaced by a classmate (id -1), once each.
    assert (arrived == -1).sum() == expected["corrupt_image"]
    for s, bad_idx in bad.items():
        good = {(s, i) for i in range(16)} - {(s, i) for i in bad_idx}
        assert not got & {(s, i) for i in bad_idx}, f"a bad sample of shard {s} was trained on"
        assert good <= got | left, f"shard {s}: good samples lost: {sorted(good - got - left)}"
    assert len(left) <= 2 * 2, "only pool leftovers (< N classes x M) go unused"
    # Rows carry the cumulative counts; the last row has seen all but what came after it.
    last = max(rows, key=lambda r: int(r["batch_index"][0]))
    metrics = data_metrics(last)
    for r in REASONS:
        assert metrics[f"data/bad_{r}"] <= expected[r]
    assert metrics["data/samples_seen"] <= report["samples_seen"]
    if expected["corrupt_image"]:
        assert max(data_metrics(r)["data/bad_corrupt_image"] for r in rows) > 0
    out = write_report(name, train.parent / "out" / "data_report.json")
    assert json.loads(out.read_text())["counts"] == expected
    del handle


def test_too_many_bad_samples_stop_the_stream_naming_the_file(ray_local, defect_set):
    train, _, _ = defect_set
    # Per pass 6 of 71 samples seen are bad before decoding (8.5%): above 5% once MIN_SEEN
    # (200) samples are seen, in pass 3; the first test ran the same data at 20%.
    with pytest.raises(Exception, match=r"max_bad_fraction=0\.05") as err:
        _run(_cfg(train, epochs=4, max_bad=0.05))
    assert "train-000000.tar" in str(err.value) or "train-000001.tar" in str(err.value)


def test_decode_failures_above_the_fraction_stop_the_stream(ray_local, tmp_path):
    train, paths = _shards(tmp_path, classes=8)
    for p in paths[:2]:  # one image in every class of the first two shards does not decode
        m = _members(p)
        keys = _samples(m)
        bad_keys = {keys[0], keys[8]}
        _write(p, [(n, CORRUPT if n.split(".")[0] in bad_keys and n.endswith(".jpg") else d) for n, d in m])
    with pytest.raises(Exception, match=r"corrupt_image") as err:
        _run(_cfg(train, epochs=8, max_bad=0.01))
    assert paths[0].name in str(err.value) or paths[1].name in str(err.value)


def test_resumed_run_skips_consumed_samples(ray_local, tiny_shards):
    from pipeline.data.position import get_or_create_position

    train = tiny_shards / "train"
    paths = sorted(train.glob("*.tar"))
    n = [len(_samples(_members(p))) for p in paths]
    consumed = np.concatenate([encode_sample_ids(0, 0, np.arange(n[0])),  # all of shard 0
                               encode_sample_ids(0, 1, np.arange(0, n[1], 2)),  # half of shard 1
                               encode_sample_ids(1, 0, [0])])  # a pass the stream will not run: no effect
    name = f"position-{uuid.uuid4().hex[:8]}"
    handle = get_or_create_position(name)
    import ray

    assert ray.get(handle.set.remote(consumed)) == len(consumed)
    report = f"report-{uuid.uuid4().hex[:8]}"
    keep = create_report(report)
    rows = _run(_cfg(train, pool=4), position=name, report=report)
    arrived = np.concatenate([r["sample_ids"][0] for r in rows])
    assert not np.isin(arrived, consumed).any()
    rep = fetch_report(report)
    skipped = n[0] + (n[1] + 1) // 2
    assert rep["resumed_skip"] == skipped and max(int(r["resumed_skip"][0]) for r in rows) <= skipped
    everything = np.concatenate([encode_sample_ids(0, s, np.arange(k)) for s, k in enumerate(n)])
    others = set(everything.tolist()) - set(consumed.tolist())
    assert set(arrived.tolist()) | set(rep["unused_ids"]) == others
    assert sum(rep["counts"].values()) == 0
    del handle, keep


def test_sample_ids_round_trip_and_refuse_overflow():
    ids = encode_sample_ids([0, 3, 7], [0, 5, 1 << 19], [0, 9, (1 << 20) - 1])
    assert ids.dtype == np.int64 and len(set(ids.tolist())) == 3
    p, s, i = decode_sample_ids(ids)
    assert p.tolist() == [0, 3, 7] and s.tolist() == [0, 5, 1 << 19] and i.tolist() == [0, 9, (1 << 20) - 1]
    assert ids[1] == (3 << 40) | (5 << 20) | 9
    with pytest.raises(ValueError, match="index_in_shard"):
        encode_sample_ids(0, 0, 1 << 20)
    with pytest.raises(ValueError, match="shard_index"):
        encode_sample_ids(0, -1, 0)
