"""Our tar reader against Python's tarfile (the slow, obviously-correct reference), and its checks."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from pipeline.data.reader import TarReadError, iter_tar, jpeg_problem


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


def test_jpeg_problem_reads_the_markers():
    assert jpeg_problem(JPG) is None
    assert jpeg_problem(JPG[:-2]) == "truncated_image"  # no end-of-image marker: a cut file
    assert jpeg_problem(b"GIF89a" + JPG) == "corrupt_image"  # no start-of-image marker
    assert jpeg_problem(b"") == "truncated_image"
