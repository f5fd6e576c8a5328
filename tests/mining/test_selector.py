"""MinedSelector (random and knn candidates) on a real miner actor, against brute-force NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.mining.actor import get_or_create_miner
from pipeline.mining.class_index import TIE_TOL
from pipeline.mining.selector import MinedSelector

DIM, NUM, M = 16, 300, 2
LABELS = np.arange(NUM, dtype=np.int64) * 3 + 7  # labels differ from class indices


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_greedy(emb, n, rng, first=None):
    """Sohn's greedy with explicit loops in float64, ties in row order, same rng draws as greedy_select."""
    emb = np.asarray(emb, dtype=np.float64)
    selected = [int(rng.integers(len(emb))) if first is None else first]
    while len(selected) < n:
        scores = {c: max(float(emb[c] @ emb[s]) for s in selected) for c in range(len(emb)) if c not in selected}
        top = max(scores.values())
        ties = [c for c in sorted(scores) if scores[c] >= top - TIE_TOL]
        selected.append(ties[int(rng.integers(len(ties)))])
    return selected


def reference_knn(emb, active, remaining, c, n, seed):
    """The knn selection by brute force: seed, its c - 1 nearest active classes, greedy from the seed."""
    rng = np.random.default_rng(seed)
    s = int(active[rng.integers(active.size)])
    sims = emb @ emb[s]
    order = [int(i) for i in np.argsort(-sims, kind="stable") if i != s and remaining[i] >= M]
    cand = [s] + order[: c - 1]
    actor_rng = np.random.default_rng(int(rng.integers(2**63 - 1)))
    return [cand[j] for j in reference_greedy(emb[cand], n, actor_rng, first=0)]


def reference_random(emb, active, c, n, seed):
    rng = np.random.default_rng(seed)
    cand = active[rng.choice(active.size, size=c, replace=False)]
    actor_rng = np.random.default_rng(int(rng.integers(2**63 - 1)))
    return [int(cand[j]) for j in reference_greedy(emb[cand], n, actor_rng)]


@pytest.fixture(scope="module")
def miner(ray_local):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, DIM))
    emb = unit(np.repeat(centres, 10, axis=0) + 0.4 * rng.standard_normal((NUM, DIM))).astype(np.float32)
    handle = get_or_create_miner("miner-selector-test", dim=DIM)
    assert ray_local.get(handle.update.remote(LABELS, emb)) == 1
    yield handle, emb
    ray_local.kill(handle)


def pass_state(seed):
    """A pass part-way through: a third of the classes inactive (fewer than M samples left)."""
    rng = np.random.default_rng(seed)
    remaining = rng.integers(2, 20, size=NUM).astype(np.int32)
    remaining[rng.choice(NUM, size=NUM // 3, replace=False)] = rng.integers(0, M, size=NUM // 3)
    active = rng.permutation(np.flatnonzero(remaining >= M))
    return active, remaining


@pytest.mark.parametrize("select_at", ["miner", "planner"])
@pytest.mark.parametrize("seed", range(6))
def test_knn_selection_matches_brute_force(miner, seed, select_at):
    _, emb = miner
    active, remaining = pass_state(seed)
    sel = MinedSelector(LABELS, "miner-selector-test", pool_classes=40, candidates="knn", images_per_class=M,
                        select_at=select_at, dim=DIM)
    assert sel.select_at == select_at
    got = sel(active, 12, np.random.default_rng(seed), remaining).tolist()
    assert got == reference_knn(emb, active, remaining, 40, 12, seed)
    assert len(set(got)) == 12 and (remaining[got] >= M).all()  # distinct, active only
    assert sel.fallbacks == 0 and sel.filled == 0 and sel.last_version == 1
    # Same seed, same classes.
    assert sel(active, 12, np.random.default_rng(seed), remaining).tolist() == got


@pytest.mark.parametrize("select_at", ["miner", "planner"])
@pytest.mark.parametrize("seed", range(4))
def test_random_selection_matches_brute_force(miner, seed, select_at):
    _, emb = miner
    active, remaining = pass_state(seed)
    sel = MinedSelector(LABELS, "miner-selector-test", pool_classes=40, candidates="random", images_per_class=M,
                        select_at=select_at, dim=DIM)
    got = sel(active, 12, np.random.default_rng(seed), remaining).tolist()
    assert got == reference_random(emb, active, 40, 12, seed)
    assert len(set(got)) == 12 and (remaining[got] >= M).all()
    assert sel.fallbacks == 0 and sel.last_version == 1


def test_auto_selects_in_the_planner_up_to_64_mib_of_table():
    small = MinedSelector(LABELS, "x", pool_classes=40, select_at="auto", dim=512)
    assert small.select_at == "planner"
    # 32,768 classes x (8 + 4 x 512) bytes = 64.25 MiB: past the limit, the miner selects.
    big = MinedSelector(np.arange(32_768), "x", pool_classes=40, select_at="auto", dim=512)
    assert big.select_at == "miner"
    assert MinedSelector(np.arange(32_000), "x", pool_classes=40, select_at="auto", dim=512).select_at == "planner"
    with pytest.raises(ValueError, match="select_at"):
        MinedSelector(LABELS, "x", pool_classes=40, select_at="gpu", dim=DIM)
    with pytest.raises(ValueError, match="dim"):
        MinedSelector(LABELS, "x", pool_classes=40, select_at="planner")


def test_knn_candidates_are_near_and_harder_than_random(miner):
    _, emb = miner
    active, remaining = pass_state(9)
    knn = MinedSelector(LABELS, "miner-selector-test", pool_classes=40, candidates="knn", images_per_class=M)
    rnd = MinedSelector(LABELS, "miner-selector-test", pool_classes=40, candidates="random", images_per_class=M)

    def mean_sim(classes):
        s = emb[classes] @ emb[classes].T
        return s[~np.eye(len(classes), dtype=bool)].mean()

    k = [mean_sim(knn(active, 12, np.random.default_rng(s), remaining)) for s in range(20)]
    r = [mean_sim(rnd(active, 12, np.random.default_rng(s), remaining)) for s in range(20)]
    assert np.mean(k) > np.mean(r) + 0.1, (np.mean(k), np.mean(r))


def test_knn_fills_at_random_when_neighbours_run_out(miner, ray_local):
    """Near the end of a pass: fewer active classes than C - 1 near ones; the rest is drawn at random, counted."""
    handle, _ = miner
    remaining = np.zeros(NUM, dtype=np.int32)
    active = np.asarray([3, 50, 101, 150, 200, 250, 299, 10], dtype=np.int64)
    remaining[active] = 5
    before = ray_local.get(handle.stats.remote())
    sel = MinedSelector(LABELS, "miner-selector-test", pool_classes=40, candidates="knn", images_per_class=M)
    got = sel(active, 6, np.random.default_rng(1), remaining)
    assert sorted(set(got.tolist())) == sorted(got.tolist()) and set(got.tolist()) <= set(active.tolist())
    # The over-fetch asks for every class (8 active of 300): all 7 other active ones are neighbours.
    assert sel.filled == 0
    # Seed classes the miner has no embedding for (new since the last refresh): the other
    # place is filled at random and counted, and so are the picks without an embedding.
    unknown = np.concatenate([LABELS, [10_000, 10_003]])
    remaining2 = np.concatenate([np.zeros(NUM, np.int32), [5, 5]])
    sel2 = MinedSelector(unknown, "miner-selector-test", pool_classes=10, candidates="knn", images_per_class=M)
    got2 = sel2(np.asarray([NUM, NUM + 1]), 2, np.random.default_rng(0), remaining2)
    assert sorted(got2.tolist()) == [NUM, NUM + 1] and sel2.filled == 1
    after = ray_local.get(handle.stats.remote())
    assert after["filled"] == before["filled"] + 1 and after["unembedded"] == before["unembedded"] + 2


def test_selector_rejects_an_unknown_candidates_mode():
    with pytest.raises(ValueError, match="miner.candidates"):
        MinedSelector(LABELS, "x", pool_classes=4, candidates="nearest")


def test_warmup_steps_draw_uniform_classes_then_mine(miner):
    """miner.warmup_steps: before it the planner's uniform draw (the same classes as a run without
    a miner, from the same per-step rng), the miner not asked; from it on, the greedy selection."""
    from pipeline.data.planner import select_uniform

    _, emb = miner
    sel = MinedSelector(LABELS, "miner-selector-test", pool_classes=64, warmup_steps=3)
    active, remaining = pass_state(11)
    for step in range(6):
        sel.step = step
        got = sel(active, 8, np.random.default_rng(step), remaining).tolist()
        if step < 3:
            assert sel.warming and sel.last_version == -1
            assert got == select_uniform(active, 8, np.random.default_rng(step), remaining).tolist()
        else:
            assert not sel.warming and sel.last_version == 1
            assert got == reference_random(emb, active, 64, 8, step)
    assert sel.fallbacks == 0
