"""Our tar reader against Python's tarfile (the slow, obviously-correct reference), and its checks."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from pipeline.data.reader import END_OF_SHARD, ShardSpec, TarReadError, iter_tar, read_shard
from pipeline.data.report import REASONS


def _tar(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_iter_tar_matches_tarfile(fmt):
    rng = np.random.default_rng(0)
    long = "d" * 90 + "/" + "n" * 80 + ".jpg"  # > 100 characters: prefix (ustar), L (GNU) or x (PAX) header
    members = [("a.jpg", rng.bytes(1000)), ("dir", None), ("a.cls", b"3"), ("b.jpg", b""), (long, rng.bytes(513)),
               ("u\u00e9.cls", b"12")]
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in members if m[0].isascii()]
    raw = _tar(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        want = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    assert list(iter_tar(io.BytesIO(raw))) == want


def test_iter_tar_names_the_cut():
    raw = _tar([("a.jpg", b"x" * 2000), ("a.cls", b"1")])
    with pytest.raises(TarReadError, match=r"shard\.tar: member at byte 0 needs 2000 bytes"):
        list(iter_tar(io.BytesIO(raw[:1000]), "shard.tar"))
    garbled = bytearray(raw)
    garbled[512 * 5 + 10] ^= 0xFF  # inside the second header (the first holds 512 + 2048 bytes)
    with pytest.raises(TarReadError, match="checksum at byte 2560"):
        list(iter_tar(io.BytesIO(bytes(garbled)), "shard.tar"))


JPG = b"\xff\xd8" + b"\x11" * 50 + b"\xff\xd9"


def _rows(raw: bytes, tmp_path, spec=None):
    p = tmp_path / "s.tar"
    p.write_bytes(raw)
    batches = list(read_shard(str(p), 3, 1, spec or ShardSpec(valid_labels=[1, 2, 3], images_per_class=2, chunk=2)))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_read_shard_flags_each_problem(tmp_path):
    members = [("k0.jpg", JPG), ("k0.cls", b"1"), ("k1.jpg", JPG), ("k1.cls", b"1"),
               ("k2.jpg", JPG[:-2]), ("k2.cls", b"1"),  # no EOI: cut
               ("k3.jpg", b"GIF89a" + JPG), ("k3.cls", b"1"),  # no SOI
               ("k4.jpg", JPG),  # no label
               ("k5.cls", b"2"),  # no image
               ("k6.jpg", JPG), ("k6.cls", b"7"),  # not in the manifest
               ("k7.jpg", JPG), ("k7.cls", b"2"),  # class 2 has one good image: too small
               ("k8.jpg", JPG), ("k8.cls", b"3"), ("k9.jpg", JPG), ("k9.cls", b"3")]
    r = _rows(_tar(members), tmp_path)
    reasons = [REASONS[b] if b >= 0 else ("end" if b == END_OF_SHARD else "ok") for b in r["bad"]]
    assert reasons == ["ok", "ok", "truncated_image", "corrupt_image", "missing_label", "missing_image",
                       "unknown_label", "small_class", "ok", "ok", "end"]
    assert r["sample_id"][:10].tolist() == [(1 << 40) | (3 << 20) | i for i in range(10)]
    assert r["sample_id"][-1] == -1 - 3
    assert r["key"][:3].tolist() == ["k0", "k1", "k2"] and r["label"][:2].tolist() == [1, 1]
    assert all(len(j) == 0 for j, b in zip(r["jpg"], r["bad"]) if b != -1)


def test_read_shard_truncated_and_empty(tmp_path):
    raw = _tar([(f"k{i}.{e}", JPG if e == "jpg" else b"1") for i in range(4) for e in ("jpg", "cls")])
    r = _rows(raw[: 512 * 9 + 10], tmp_path)  # inside the 5th member's header: samples 0, 1 survive
    reasons = [REASONS[b] if b >= 0 else int(b) for b in r["bad"]]
    assert reasons == [-1, -1, "truncated_tar", END_OF_SHARD]
    assert "truncated" in r["key"][2] and "s.tar" in r["key"][2]
    for raw in (b"", _tar([])):
        r = _rows(raw, tmp_path)
        assert [int(b) for b in r["bad"]] == [REASONS.index("empty_shard"), END_OF_SHARD]

