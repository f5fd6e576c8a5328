"""The decode stage on composed rows (called directly, no Ray): repair from a classmate, drop a row
whose class has no decodable image, switch off a side batch that cannot be repaired."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.data.reader import encode_sample_ids
from pipeline.data.report import REASONS
from pipeline.data.stream import DecodeBatches, _pack

BAD = b"\xff\xd8\xff\xe0" + bytes(range(256)) + b"\xff\xd9"


def _jpg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _batch(rows: list[list[bytes]], labels: list[list[int]], rand: list[list[bytes]] | None = None) -> dict:
    n, km = len(rows), len(rows[0])
    packed = [_pack(r) for r in rows]
    ids = np.stack([encode_sample_ids(0, 2, np.arange(km) + 10 * i) for i in range(n)])
    out = {"jpg_blob": np.array([p[0] for p in packed], dtype=object), "jpg_offsets": np.stack([p[1] for p in packed]),
           "keys": np.array(["\n".join(f"k{i}_{j}" for j in range(km)) for i in range(n)], dtype=object),
           "sample_ids": ids, "labels": np.asarray(labels, dtype=np.int64), "batch_index": np.arange(n),
           "bad_counts": np.zeros((n, len(REASONS)), dtype=np.int64), "samples_seen": np.full(n, 50),
           "resumed_skip": np.zeros(n, dtype=np.int64)}
    if rand is not None:
        rp = [_pack(r) for r in rand]
        out.update({"rand_blob": np.array([p[0] for p in rp], dtype=object), "rand_offsets": np.stack([p[1] for p in rp]),
                    "rand_labels": np.asarray(labels, dtype=np.int64), "has_rand": np.ones(n, dtype=bool),
                    "select_ms": np.ones(n, np.float32), "miner_version": np.ones(n, np.int64),
                    "trainer_step": np.zeros(n, np.int64), "fallbacks": np.zeros(n, np.int64)})
    return out


def test_a_failed_image_is_replaced_by_its_classmate_and_counted():
    stage = DecodeBatches(8, augment=False, seed=0, paths=["a.tar", "b.tar", "shard-2.tar"])
    rows = [[_jpg(10), BAD, _jpg(30), _jpg(40)]]
    out = list(stage(_batch(rows, [[1, 1, 2, 2]])))[0]
    img = out["images"][0]
    assert (img[1] == img[0]).all() and abs(int(img[0].mean()) - 10) <= 2 and abs(int(img[2].mean()) - 30) <= 2
    assert out["sample_ids"][0].tolist() == [encode_sample_ids(0, 2, 0), -1, encode_sample_ids(0, 2, 2),
                                             encode_sample_ids(0, 2, 3)]
    assert out["bad_counts"][0][REASONS.index("corrupt_image")] == 1
    assert stage.items == [("shard-2.tar", "k0_1", "corrupt_image")]


def test_a_row_whose_class_failed_is_dropped_and_the_others_kept():
    stage = DecodeBatches(8, augment=True, seed=0)
    rows = [[BAD, BAD, _jpg(30), _jpg(40)], [_jpg(50), _jpg(60), _jpg(70), _jpg(80)]]
    out = list(stage(_batch(rows, [[1, 1, 2, 2], [3, 3, 4, 4]])))[0]
    assert out["labels"].tolist() == [[3, 3, 4, 4]] and out["batch_index"].tolist() == [1]
    assert out["bad_counts"][0][REASONS.index("corrupt_image")] == 2
    assert list(stage(_batch([[BAD, BAD, BAD, BAD]], [[1, 1, 2, 2]]))) == []  # nothing left: yields nothing


def test_a_side_batch_that_cannot_be_repaired_is_switched_off():
    stage = DecodeBatches(8, augment=False, seed=0)
    good = [_jpg(10), _jpg(20), _jpg(30), _jpg(40)]
    out = list(stage(_batch([good, good], [[1, 1, 2, 2]] * 2, rand=[[BAD, BAD, _jpg(1), _jpg(2)], good])))[0]
    assert out["has_rand"].tolist() == [False, True]
    assert not out["rand_images"][0].any() and (out["rand_labels"][0] == -1).all()
    assert abs(int(out["rand_images"][1][3].mean()) - 40) <= 2
    # A side batch holds copies of pool images: its failures are not counted again.
    assert out["bad_counts"][:, REASONS.index("corrupt_image")].tolist() == [0, 0]
