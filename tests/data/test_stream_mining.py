"""The training stream with the miner: harder batches than random ones, and no stop when the miner dies."""

from __future__ import annotations

import functools

import numpy as np

from pipeline.config import load_config
from pipeline.data.stream import GATE_BLOCK_BATCHES, build_train_dataset
from pipeline.mining.actor import MinerClient

DIM = 8


def _cfg(tiny_shards, epochs: int):
    return load_config(None, [f"data.train={tiny_shards}/train", "data.image_size=32", "batch.classes_per_batch=4",
                              "scaling.num_workers=1", "miner.pool_classes=12", f"data.epochs={epochs}",
                              "train.seed=5"])


def _class_embeddings(tiny_shards):
    import json

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    ids = np.asarray(sorted(c["id"] for c in manifest["classes"] if c["split"] == "train"))
    emb = np.random.default_rng(0).standard_normal((len(ids), DIM)).astype(np.float32)
    return ids, emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _hardest_neg(labels: np.ndarray, ids: np.ndarray, emb: np.ndarray) -> float:
    """Mean over the batch's classes of the cosine to the most similar other class in the batch."""
    cls = np.unique(labels)
    e = emb[np.searchsorted(ids, cls)]
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return float(sim.max(axis=1).mean())


def test_mined_batches_are_harder_than_random_ones(ray_local, tiny_shards):
    ray = ray_local
    from pipeline.mining.actor import get_or_create_miner

    ids, emb = _class_embeddings(tiny_shards)
    miner = get_or_create_miner("miner-stream-hard", dim=DIM)
    assert ray.get(miner.update.remote(ids, emb)) == 1
    ds = build_train_dataset(_cfg(tiny_shards, 3), miner=functools.partial(MinerClient, name="miner-stream-hard", timeout_s=10.0),
                             random_every=2)
    rows = list(ds.iter_batches(batch_size=1, batch_format="numpy"))
    assert len(rows) >= 20
    mined, rand = [], []
    for r in rows:
        assert r["images"].shape == r["rand_images"].shape == (1, 8, 32, 32, 3)
        assert r["fallbacks"][0] == 0 and r["miner_version"][0] == 1 and r["select_ms"][0] > 0
        mined.append(_hardest_neg(r["labels"][0], ids, emb))
        if r["has_rand"][0]:
            labels = r["rand_labels"][0]
            assert len(np.unique(labels)) == 4 and (labels[::2] == labels[1::2]).all()
            rand.append(_hardest_neg(labels, ids, emb))
        else:
            assert (r["rand_labels"][0] == -1).all() and not r["rand_images"][0].any()
    assert len(rand) >= len(rows) // 2 - 1
    # Greedy picks from a pool of 12: clearly harder than 4 random classes of the same pool.
    assert np.mean(mined) > np.mean(rand) + 0.1, (np.mean(mined), np.mean(rand))
    ray.kill(miner)


def test_stream_goes_on_with_random_classes_when_the_miner_dies(ray_local, tiny_shards):
    ray = ray_local
    from pipeline.mining.actor import get_or_create_miner

    ids, emb = _class_embeddings(tiny_shards)
    miner = get_or_create_miner("miner-stream-kill", dim=DIM, max_restarts=2)
    ray.get(miner.update.remote(ids, emb))
    epochs = 20
    ds = build_train_dataset(_cfg(tiny_shards, epochs), miner=functools.partial(MinerClient, name="miner-stream-kill", timeout_s=0.2))
    rows = []
    for r in ds.iter_batches(batch_size=1, batch_format="numpy"):
        if not rows:
            ray.kill(miner, no_restart=False)  # crash it as soon as the stream runs
        rows.append(r)
    # The parallel decode stage may deliver rows out of composition order: put them back.
    rows.sort(key=lambda r: int(r["batch_index"][0]))
    assert [int(r["batch_index"][0]) for r in rows] == list(range(len(rows)))
    versions = np.array([r["miner_version"][0] for r in rows])
    fallbacks = np.array([r["fallbacks"][0] for r in rows])
    assert versions[0] == 1
    assert fallbacks[-1] > 0 and (versions == -1).sum() == fallbacks[-1], "fallbacks are counted per batch"
    assert (np.diff(fallbacks) >= 0).all()
    # The stream ran to the end: 20 classes x 8 images per epoch, 8 images per batch, minus pool leftovers.
    assert len(rows) >= 0.8 * 20 * 8 * epochs / 8
    for r in rows:
        labels = r["labels"][0]
        assert len(np.unique(labels)) == 4 and (labels[::2] == labels[1::2]).all()


def test_gate_keeps_the_composer_close_to_the_trainer(ray_local, tiny_shards):
    ray = ray_local
    from pipeline.mining.actor import get_or_create_miner
    from pipeline.mining.refresh import get_or_create_refresher

    ids, emb = _class_embeddings(tiny_shards)
    miner = get_or_create_miner("miner-stream-gate", dim=DIM)
    ray.get(miner.update.remote(ids, emb))
    progress = get_or_create_refresher("refresher-stream-gate", "miner-stream-gate", str(tiny_shards / "exemplars"),
                                       {}, image_size=32)  # only its step counter is used here
    lead = 4
    ds = build_train_dataset(_cfg(tiny_shards, 4), miner=functools.partial(MinerClient, name="miner-stream-gate", timeout_s=10.0),
                             gate={"actor": "refresher-stream-gate", "max_lead": lead})
    lags = []
    for step, r in enumerate(ds.iter_batches(batch_size=1, batch_format="numpy"), 1):
        lags.append(step - r["trainer_step"][0])  # one row per step with one rank
        progress.set_step.remote(step)
    # Selected at most `lead` batches ahead of the step the gate last read, plus what one
    # composer call makes from one decoded block (about GATE_BLOCK_BATCHES batches of images,
    # up to 1.5x that, plus what the pool held); without the gate the lag grows to ~70.
    assert len(lags) >= 50 and max(lags) <= lead + 4 * GATE_BLOCK_BATCHES, max(lags)
    ray.kill(progress)
    ray.kill(miner)
