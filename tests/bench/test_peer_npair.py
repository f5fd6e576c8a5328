"""bench/peer_npair.py: Sohn's greedy class pick against brute force, and a few peer steps on tiny shards."""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest

from bench.peer_npair import greedy_classes, load_split, ours_command, summarise, train_peer


def _brute_greedy(e: np.ndarray, first: int, n: int) -> list[int]:
    """The same rule by exhaustive scoring: next = argmax over candidates of max cosine to any chosen."""
    chosen = [first]
    while len(chosen) < n:
        rest = [j for j in range(len(e)) if j not in chosen]
        chosen.append(max(rest, key=lambda j: max(float(e[j] @ e[c]) for c in chosen)))
    return chosen


def test_greedy_pick_matches_brute_force_and_prefers_look_alikes():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    pool = rng.choice(60, size=30, replace=False)  # class ids of the pool's rows in a class table of 60
    table = np.zeros((60, 8))
    table[pool] = e
    for seed in range(5):
        got = greedy_classes(table, pool, 6, np.random.default_rng(seed))
        first = int(np.flatnonzero(pool == got[0])[0])
        assert [int(np.flatnonzero(pool == g)[0]) for g in got] == _brute_greedy(e, first, 6)
        assert len(set(got.tolist())) == 6
    # Two tight clusters: starting in one, the pick stays in it until it is used up.
    cluster = np.repeat(np.eye(8)[:2], 4, axis=0) + 0.01 * rng.normal(size=(8, 8))
    cluster /= np.linalg.norm(cluster, axis=1, keepdims=True)
    got = greedy_classes(cluster, np.arange(8), 4, np.random.default_rng(1))
    assert len({int(g) // 4 for g in got}) == 1


@pytest.mark.parametrize("mine, dot", list(itertools.product([False, True], [False, True])))
def test_a_few_peer_steps_train_and_evaluate(tiny_shards, mine, dot):
    args = argparse.Namespace(backbone="tiny", dim=8, norm="batch", dot=dot, l2_reg=0.002, lr=1e-3, steps=3, n=4,
                              pool=8, device="cpu")
    train, hold = load_split(tiny_shards, "train", 32), load_split(tiny_shards, "holdout", 32)
    assert train[0].shape == (160, 32, 32, 3) and len(np.unique(train[1])) == 20 and len(hold[1]) == 160
    res = train_peer(args, 0, mine, train, hold)
    assert 0 < res["recall@1"] <= 1 and 0 < res["untrained_recall@1"] <= 1 and res["train_s"] > 0
    again = train_peer(args, 0, mine, train, hold)
    assert again["untrained_recall@1"] == res["untrained_recall@1"]  # same seed, same initial weights


def test_summary_per_side_and_batches_in_run_order():
    runs = [{"side": "peer", "mined": False, "seed": s, "recall@1": r, "train_s": 10.0 + s} for s, r in enumerate([0.5, 0.7])]
    runs.insert(1, {"side": "ours", "mined": True, "seed": 0, "recall@1": 0.9, "train_s": 3.0})
    summary = summarise(runs)
    assert list(summary) == ["peer_random", "ours_mined"]
    assert summary["peer_random"]["recall@1_mean"] == pytest.approx(0.6)
    assert summary["peer_random"]["recall@1_std"] == pytest.approx(0.1)  # population sd
    assert summary["peer_random"]["per_seed"] == [0.5, 0.7] and summary["peer_random"]["train_s_mean"] == 10.5
    assert summary["ours_mined"]["recall@1_std"] == 0.0


@pytest.mark.parametrize("mine", [False, True])
def test_ours_reports_its_last_step_like_the_peer(tmp_path, mine):
    """jobs.train's config from ours' command: the peer's settings, and no best-checkpoint pick on the held-out set."""
    from pipeline.config import load_config

    args = argparse.Namespace(backbone="resnet18", dim=64, norm="batch", l2_reg=0.002, lr=1e-3, steps=1500, n=32,
                              pool=128, device="cpu", image_size=64, overrides=["miner.warmup_steps=128"])
    cmd = ours_command(args, 2, mine, tmp_path / "data", tmp_path / "out")
    assert cmd[1:4] == ["-m", "jobs.train", "--config"]
    cfg = load_config(cmd[4], cmd[5:])
    assert cfg.eval.every == 0  # the run's result is its last step's network (quickstart.yaml evaluates every 100)
    assert (cfg.model.backbone, cfg.batch.classes_per_batch, cfg.train.steps, cfg.train.seed) == ("resnet18", 32, 1500, 2)
    assert (cfg.miner.enabled, cfg.miner.pool_classes, cfg.miner.warmup_steps) == (mine, 128, 128)
    assert cfg.data.eval == str(tmp_path / "data" / "holdout") and cfg.data.augment == "none"
