"""The Ray Data stream on a real local Ray: N-pair rows, equal counts per rank."""

from __future__ import annotations

import json
import threading

import numpy as np

from pipeline.config import load_config
from pipeline.data.reader import decode_sample_ids
from pipeline.data.stream import build_train_dataset


def test_stream_gives_equal_npair_batches_per_rank(ray_local, tiny_shards):
    cfg = load_config(None, [f"data.train={tiny_shards}/train", "data.image_size=32", "batch.classes_per_batch=4",
                             "scaling.num_workers=2", "miner.pool_classes=8", "data.epochs=2", "train.seed=3"])
    ds = build_train_dataset(cfg)
    splits = ds.streaming_split(2, equal=True)
    rows: list[list[dict]] = [[], []]

    def consume(i):
        for b in splits[i].iter_batches(batch_size=1, batch_format="numpy"):
            rows[i].append({"images": b["images"][0], "labels": b["labels"][0], "sample_ids": b["sample_ids"][0],
                            "bad_counts": b["bad_counts"][0]})

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(rows[0]) == len(rows[1]) > 0
    # 20 train classes x 8 images x 2 epochs = 320 images; a batch per rank holds 2 classes x 2.
    total = sum(len(r) for r in rows) * 4
    assert 160 <= total <= 320
    for r in rows[0] + rows[1]:
        assert r["images"].shape == (4, 32, 32, 3) and r["images"].dtype == np.uint8
        labels = r["labels"]
        assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]
    # Every sample at most once per pass, and the id names the pass and the shard it came from.
    ids = np.concatenate([r["sample_ids"] for rr in rows for r in rr])
    assert len(set(ids.tolist())) == len(ids) and (ids >= 0).all()
    passes, shard, _ = decode_sample_ids(ids)
    assert set(passes.tolist()) == {0, 1} and shard.max() < 4
    assert all(not r["bad_counts"].any() for rr in rows for r in rr)
    seen = {c for rr in rows for r in rr for c in r["labels"].tolist()}
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    train_ids = {c["id"] for c in manifest["classes"] if c["split"] == "train"}
    assert seen <= train_ids and len(seen) >= 15
