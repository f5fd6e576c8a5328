"""The training workers' side of mining: EMA pushes and exemplars embedded by the trainers, on a real miner actor."""

from __future__ import annotations

import collections
import socket
import time

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.mining.trainer_side import TrainerMining, embed_in_eval_mode, load_exemplar_share, trainer_mode

STEPS, LEAD = 200, 20


def _cfg(tiny_shards, *overrides):
    return load_config(None, [f"data.train={tiny_shards}/train", "data.image_size=32", "model.backbone=tiny",
                              "model.embedding_dim=16", "model.norm=group", "miner.enabled=true",
                              "batch.classes_per_batch=4", *overrides])


def test_trainer_mode_follows_source_and_refresh_by(tiny_shards):
    assert trainer_mode(_cfg(tiny_shards, "miner.enabled=false")) is None
    assert trainer_mode(_cfg(tiny_shards, "miner.source=ema")) == "ema"
    assert trainer_mode(_cfg(tiny_shards)) is None  # auto without GPUs: the refresher actor
    assert trainer_mode(_cfg(tiny_shards, "scaling.use_gpu=true")) == "exemplars"  # every GPU is a trainer's
    assert trainer_mode(_cfg(tiny_shards, "miner.refresh_by=trainers")) == "exemplars"


def test_pending_means_are_per_class_means_over_the_steps(tiny_shards):
    hook = TrainerMining(_cfg(tiny_shards, "miner.source=ema"), "no-run", 0, 1)
    rng = np.random.default_rng(0)
    seen = collections.defaultdict(list)
    for _ in range(5):
        labels = rng.choice(10, size=8)
        emb = rng.standard_normal((8, 6)).astype(np.float32)
        hook._add(torch.from_numpy(emb), torch.from_numpy(labels))
        for lab, e in zip(labels, emb):
            seen[int(lab)].append(e)
    ids, means = hook.pending_means()
    assert ids.tolist() == sorted(seen)
    np.testing.assert_allclose(means, [np.mean(seen[c], axis=0) for c in ids], atol=1e-6)
    assert hook.pending_means()[0].tolist() == []  # cleared by the read


def test_exemplar_shares_split_the_classes_and_embed_in_eval_mode(tiny_shards):
    spec = str(tiny_shards / "exemplars")
    shares = [load_exemplar_share(spec, r, 3) for r in range(3)]
    classes = [set(s[1].tolist()) for s in shares]
    assert sum(len(c) for c in classes) == 20 and not (classes[0] & classes[1] or classes[1] & classes[2])
    assert all(np.bincount(s[1])[list(c)].tolist() == [2] * len(c) for s, c in zip(shares, classes))
    one = load_exemplar_share(spec, 0, 3, per_class=1)
    assert one[1].tolist() == sorted(classes[0])
    from pipeline.data.decode import decode_images
    from pipeline.models import build_model

    model = build_model(_cfg(tiny_shards).model)
    model.train()
    images, ok = decode_images(shares[0][0], 32)
    emb = embed_in_eval_mode(model, images, "cpu", batch_size=5)
    assert model.training and emb.shape == (len(images), 16)
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(emb, model(torch.from_numpy(images)).numpy(), atol=1e-5)


class Worker:
    """A training worker's loop reduced to what mining sees: a real SGD step of the tiny model, then the hook."""

    def __init__(self, cfg_dict: dict, run_id: str, rank: int, world: int, classes: list[int], port: int):
        from pipeline.config import config_from_dict
        from pipeline.losses import build_loss
        from pipeline.models import build_model

        torch.manual_seed(0)
        torch.set_num_threads(1)
        # DDP over gloo, as Ray Train's workers on CPUs: the ranks step in lockstep.
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
        self.cfg = config_from_dict(cfg_dict)
        self.model = build_model(self.cfg.model)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.loss = build_loss("npair_mc", l2_reg=0.002, cross_rank=False)
        self.hook = TrainerMining(self.cfg, run_id, rank, world)
        self.rank, self.classes = rank, np.asarray(classes)
        self.rng = np.random.default_rng(rank)

    def run(self, steps: int, lead: int, pool: int) -> dict:
        """``steps`` steps; rank 0 also plays the planner: the classes of step s are selected at step s - lead."""
        from pipeline.mining.selector import MinedSelector

        sel = MinedSelector(self.classes, self.hook.miner, pool_classes=pool, candidates="knn")
        planned = collections.deque()
        ages, versions, rows = [], [], []
        for step in range(1, steps + 1):
            while self.rank == 0 and len(planned) <= lead:
                active = np.arange(len(self.classes))
                picked = sel(active, 2, self.rng, np.full(len(self.classes), 10))
                planned.append((self.classes[picked], sel.last_version))
            labels, version = planned.popleft() if self.rank == 0 else (self.rng.choice(self.classes, 2, replace=False), -1)
            labels = torch.from_numpy(np.repeat(labels, 2))
            images = torch.from_numpy(self.rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
            self.model.train()
            emb = self.ddp(images)
            self.opt.zero_grad()
            self.loss(emb, labels).backward()
            self.opt.step()
            row = self.hook.after_step(step, emb.detach(), labels, self.model,
                                       {"miner_version": torch.tensor([version])}, None)
            versions.append(version)
            rows.append(row)
            if "mine/refresh_age_steps" in row:
                ages.append(row["mine/refresh_age_steps"])
        torch.distributed.destroy_process_group()
        return {"ages": ages, "versions": versions, "rows": rows, "refreshes": self.hook.refreshes,
                "pushes": self.hook.pushes, "push_failed": self.hook.push_failed, "stats": self.hook.stats}


@pytest.fixture(scope="module")
def worker_cls(ray_local):
    return ray_local.remote(num_cpus=1)(Worker)


@pytest.mark.parametrize("source", ["exemplars", "ema"])
def test_two_workers_keep_the_miner_fresh_with_every_gpu_held(ray_local, tiny_shards, worker_cls, source):
    """2 workers, scaling.use_gpu off but the refresh made as on a full GPU cluster (the trainers do it).

    Over 200 steps the index version keeps increasing, no refresh is skipped, and the mean
    age of the embeddings behind the trained batches (selected LEAD = 20 steps ahead, as the
    planner does with ``data.max_lead=20``) stays below 2 x refresh_every.
    """
    from pipeline.config import to_dict
    from pipeline.mining.actor import get_or_create_miner, miner_name
    from pipeline.mining.refresh import class_means
    from pipeline.mining.trainer_side import embed_in_eval_mode as embed
    from pipeline.models import build_model

    cfg = _cfg(tiny_shards, f"miner.source={source}", "miner.refresh_by=trainers", "miner.refresh_every=20",
               "miner.push_every=5", "miner.index=hnsw")
    run_id = f"trainer-side-{source}"
    miner = get_or_create_miner(miner_name(run_id), dim=16, index="hnsw")
    spec = str(tiny_shards / "exemplars")
    jpgs, labels = load_exemplar_share(spec, 0, 1)
    classes = sorted(set(labels.tolist()))
    if source == "exemplars":  # the driver's initial refresh, as start_miner makes it
        from pipeline.data.decode import decode_images

        torch.manual_seed(0)
        ids, means = class_means(embed(build_model(cfg.model), decode_images(jpgs, 32)[0], "cpu"), labels)
        assert ray_local.get(miner.update.remote(ids, means, 0)) == 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workers = [worker_cls.remote(to_dict(cfg), run_id, r, 2, classes, port) for r in range(2)]
    out = ray_local.get([w.run.remote(STEPS, LEAD, 8) for w in workers], timeout=300)
    want = 1 + 2 * STEPS // 20 if source == "exemplars" else 2 * STEPS // 5
    deadline = time.monotonic() + 30
    while (stats := ray_local.get(miner.stats.remote()))["version"] < want and time.monotonic() < deadline:
        time.sleep(0.1)  # the last pushes were fire and forget
    versions = np.asarray(out[0]["versions"])
    assert (np.diff(versions) >= 0).all(), versions.tolist()  # never goes back
    per_window = [versions[i:i + 40].max() for i in range(0, STEPS, 40)]
    assert all(b > a for a, b in zip(per_window, per_window[1:])), per_window  # and keeps increasing
    assert all(o["push_failed"] == 0 for o in out)
    ages = np.asarray(out[0]["ages"])
    assert len(ages) > STEPS // 2
    if source == "exemplars":
        # Every rank refreshed at every 20th step: none skipped, each a push of its half of the classes.
        assert [o["refreshes"] for o in out] == [STEPS // 20] * 2 and [o["pushes"] for o in out] == [STEPS // 20] * 2
        assert stats["version"] == want and stats["classes"] == len(classes)
        skipped = [r["mine/refresh_skipped"] for r in out[0]["rows"] if "mine/refresh_skipped" in r]
        assert skipped == [0.0] * (STEPS // 20)
        assert ages.mean() < 2 * cfg.miner.refresh_every, ages.mean()
    else:
        assert [o["pushes"] for o in out] == [STEPS // 5] * 2
        assert stats["version"] == want and stats["classes"] == len(classes)
        # Every class is trained every few steps here, so the EMA is fresh: the lead plus a push interval or so.
        assert ages.mean() < 2 * cfg.miner.refresh_every, ages.mean()
    # The planner never waited: only the first selections (before the first push) could be random.
    assert stats["unembedded"] <= (0 if source == "exemplars" else 2 * (LEAD + 10))
    ray_local.kill(miner)


def test_a_rolling_refresh_embeds_a_window_of_classes_at_a_time(ray_local, tiny_shards):
    """miner.refresh_classes = 6 of 20 classes: each refresh pushes 6, and 4 refreshes cover every class."""
    from pipeline.mining.actor import get_or_create_miner, miner_name
    from pipeline.models import build_model

    cfg = _cfg(tiny_shards, "miner.refresh_by=trainers", "miner.refresh_classes=6")
    miner = get_or_create_miner(miner_name("rolling"), dim=16)
    hook = TrainerMining(cfg, "rolling", 0, 1)
    model = build_model(cfg.model)
    seen = []
    for k in range(1, 5):
        hook.refresh(10 * k, model, "cpu")
        ray_local.get(hook._last_push)
        snap_ids = ray_local.get(miner.stats.remote())
        seen.append(snap_ids["classes"])
    assert seen == [6, 12, 18, 20]  # the window wraps: the 4th refresh re-embeds 4 classes of the first window
    steps = ray_local.get(miner.stats.remote())["version_steps"]
    # 18, 19, 0-3 at step 40; 4, 5 still at 10; 6-11 at 20; 12-17 at 30: rows keep the step of their push.
    assert steps[4] == pytest.approx((6 * 40 + 2 * 10 + 6 * 20 + 6 * 30) / 20)
    ray_local.kill(miner)
