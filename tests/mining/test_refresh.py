"""Refreshing the miner: exemplar shards, class means from a state dict, asynchronous requests."""

from __future__ import annotations

import dataclasses
import json
import tarfile
import time

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.data.layouts import synthetic_classes
from pipeline.data.manifest import ShardError, list_shards
from pipeline.data.shards import write_shards
from pipeline.mining.refresh import AsyncRefresh, class_means, get_or_create_refresher, resolve_exemplars

MODEL = ModelConfig(backbone="tiny", embedding_dim=16)


def _samples(path) -> list[tuple[str, int]]:
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers()]
        return [(n[:-4], int(tar.extractfile(n[:-4] + ".cls").read())) for n in names if n.endswith(".jpg")]


def test_exemplar_shards_hold_the_first_images_of_each_train_class(tmp_path):
    classes = synthetic_classes(10, 5, image_size=16, seed=0)
    m = write_shards(classes, tmp_path, holdout_fraction=0.4, shard_size=4, seed=0, workers=1, progress=False,
                     exemplars=2)
    train = sorted(c["id"] for c in m["classes"] if c["split"] == "train")
    assert m["splits"]["exemplars"] == {"classes": 6, "images": 12, "shards": 3, "per_class": 2}
    got = [s for e in m["exemplar_shards"] for s in _samples(tmp_path / e["path"])]
    assert [k for k, _ in got] == [f"{cid:07d}_{k}" for cid in train for k in classes[cid].keys[:2]]
    assert all(e["path"].startswith("exemplars/") for e in m["exemplar_shards"])
    # data.train = OUT/train never sees them; the sibling is found for the miner.
    assert not any("exemplars" in p for p in list_shards(str(tmp_path / "train"))[0])
    assert resolve_exemplars(str(tmp_path / "train")) == str(tmp_path / "exemplars")
    assert resolve_exemplars(str(tmp_path / "train" / "*.tar")) == str(tmp_path / "exemplars")
    assert json.loads((tmp_path / "manifest.json").read_text()) == m
    assert write_shards(classes, tmp_path, holdout_fraction=0.4, shard_size=4, seed=0, workers=1, progress=False,
                        exemplars=2) == m  # resumed: same manifest


def test_missing_exemplars_say_what_to_do(tmp_path):
    write_shards(synthetic_classes(4, 2, image_size=16), tmp_path, workers=1, progress=False)
    assert not (tmp_path / "exemplars").exists()
    with pytest.raises(ShardError, match="make_shards.*data.exemplars"):
        resolve_exemplars(str(tmp_path / "train"))


def test_class_means_cap_uses_smallest_keys():
    emb = np.arange(12, dtype=np.float32).reshape(6, 2)
    labels = np.array([3, 1, 3, 1, 3, 1])
    keys = np.array(["c", "b", "a", "a", "b", "c"])
    ids, means = class_means(emb, labels, keys, per_class=2)
    assert ids.tolist() == [1, 3]
    np.testing.assert_allclose(means, [emb[[1, 3]].mean(0), emb[[2, 4]].mean(0)])
    _, all_means = class_means(emb, labels)
    np.testing.assert_allclose(all_means[1], emb[[0, 2, 4]].mean(0))


def _reference_class_embeddings(spec: str, state: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Direct torch forward (eval mode) of every exemplar image, averaged per class."""
    from pipeline.data.decode import decode_images
    from pipeline.models import build_model

    model = build_model(MODEL)
    model.load_state_dict(state)
    model.eval()
    jpgs, labels = [], []
    for path in list_shards(spec)[0]:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    jpgs.append(tar.extractfile(m).read())
                    labels.append(int(tar.extractfile(m.name[:-4] + ".cls").read()))
    imgs, ok = decode_images(jpgs, size)
    assert ok.all()
    with torch.no_grad():
        emb = model(torch.from_numpy(imgs)).double().numpy()
    labels = np.asarray(labels)
    ids = np.unique(labels)
    return ids, np.stack([emb[labels == c].mean(0) for c in ids])


def _state(seed: int) -> dict:
    from pipeline.models import build_model

    torch.manual_seed(seed)
    model = build_model(MODEL)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def test_refresh_publishes_class_means_of_a_direct_forward(ray_local, tiny_shards):
    ray = ray_local
    from pipeline.mining.actor import get_or_create_miner

    spec = resolve_exemplars(str(tiny_shards / "train"))
    miner = get_or_create_miner("miner-refresh-exact", dim=MODEL.embedding_dim)
    refresher = get_or_create_refresher("refresher-exact", "miner-refresh-exact", spec, dataclasses.asdict(MODEL),
                                        image_size=32, batch_size=16)
    state = _state(0)
    out = ray.get(refresher.refresh.remote([ray.put(state)], 7), timeout=120)
    assert out["version"] == 1 and out["classes"] == 20 and out["step"] == 7 and out["refresh_s"] > 0
    assert ray.get(miner.version.remote()) == 1

    ids, want = _reference_class_embeddings(spec, state, 32)
    from pipeline.mining.refresh import embed_exemplars

    emb, labels, keys = embed_exemplars(spec, dataclasses.asdict(MODEL), ray.put(state), 32, batch_size=16)
    got_ids, got = class_means(emb, labels, keys)
    assert got_ids.tolist() == ids.tolist()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The miner holds exactly those means, L2-normalised: its FAISS similarities are their cosines.
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    nn_ids, nn_sims = ray.get(miner.nearest_classes.remote(ids, len(ids)))
    for row in range(len(ids)):
        found = nn_ids[row] >= 0  # the class itself is left out (-1, -inf)
        expect = (unit @ unit[row])[np.searchsorted(ids, nn_ids[row][found])]
        np.testing.assert_allclose(nn_sims[row][found], expect, atol=1e-5)
    # A second refresh with other weights is a new version.
    assert ray.get(refresher.refresh.remote([ray.put(_state(1))], 8), timeout=60)["version"] == 2
    ray.kill(refresher)
    ray.kill(miner)


def test_request_never_blocks_and_skips_while_busy(ray_local, tiny_shards):
    ray = ray_local
    from pipeline.mining.actor import get_or_create_miner

    spec = resolve_exemplars(str(tiny_shards / "train"))
    miner = get_or_create_miner("miner-refresh-async", dim=MODEL.embedding_dim)
    refresher = get_or_create_refresher("refresher-async", "miner-refresh-async", spec, dataclasses.asdict(MODEL),
                                        image_size=32, batch_size=8)
    ray.get(refresher.refresh.remote([ray.put(_state(0))], 0), timeout=120)  # warm: Ray Data imported
    assert ray.get(miner.version.remote()) == 1

    client = AsyncRefresh("refresher-async")
    t0 = time.perf_counter()
    assert client.request(_state(1), step=20) is True
    took = time.perf_counter() - t0
    # The refresh itself takes >= 0.1 s (a Ray Data run); the request only puts the weights.
    assert took < 0.1, took
    assert ray.get(miner.version.remote()) == 1, "the version must change later, not during request()"
    assert client.request(_state(2), step=21) is False and client.skipped == 1  # busy: skipped, counted
    assert client.poll() is None

    deadline, done = time.monotonic() + 60, None
    while done is None and time.monotonic() < deadline:
        time.sleep(0.05)
        done = client.poll()
    assert done is not None and done["version"] == 2 and done["step"] == 20
    assert ray.get(miner.version.remote()) == 2 and client.failed == 0 and client.launched == 1

    # A refresher that does not exist is counted as failed, never raised into the training loop.
    lost = AsyncRefresh("no-such-refresher")
    assert lost.request(_state(1), step=1) is False and lost.failed == 1
    ray.kill(refresher)
    ray.kill(miner)
