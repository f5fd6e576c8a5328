"""ClassEmbeddingIndex and greedy_select against a slow, obviously-correct reference."""

import itertools
import threading
import time

import numpy as np
import pytest

from pipeline.mining.class_index import TIE_TOL, ClassEmbeddingIndex, greedy_select


def normalised(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_greedy(emb, n, rng, tie_tol=TIE_TOL):
    """Sohn's greedy step with explicit loops in float64; same rng draws as greedy_select."""
    emb = np.asarray(emb, dtype=np.float64)
    num, dim = emb.shape
    selected = [int(rng.integers(num))]
    while len(selected) < n:
        scores = {}
        for c in range(num):
            if c in selected:
                continue
            best_to_selected = -np.inf
            for s in selected:
                dot = sum(emb[c, k] * emb[s, k] for k in range(dim))
                best_to_selected = max(best_to_selected, dot)
            scores[c] = best_to_selected
        top = max(scores.values())
        ties = [c for c in sorted(scores) if scores[c] >= top - tie_tol]
        selected.append(ties[int(rng.integers(len(ties)))])
    return selected


def clustered(rng, n_clusters, per_cluster, dim, noise):
    centres = rng.standard_normal((n_clusters, dim))
    x = np.repeat(centres, per_cluster, axis=0) + noise * rng.standard_normal((n_clusters * per_cluster, dim))
    return normalised(x)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_matches_reference(seed):
    emb = normalised(np.random.default_rng(100 + seed).standard_normal((40, 6)))
    fast = greedy_select(emb, 12, np.random.default_rng(seed))
    ref = reference_greedy(emb, 12, np.random.default_rng(seed))
    assert fast.tolist() == ref


@pytest.mark.parametrize("seed", range(8))
def test_greedy_matches_reference_with_exact_ties(seed):
    # Groups of identical embeddings: every step has a multi-way tie to break.
    base = normalised(np.random.default_rng(200 + seed).standard_normal((6, 5)))
    emb = np.repeat(base, 5, axis=0)
    fast = greedy_select(emb, 14, np.random.default_rng(seed))
    ref = reference_greedy(emb, 14, np.random.default_rng(seed))
    assert fast.tolist() == ref


def test_select_maps_class_ids_like_reference():
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)[:50] + 7
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    index = ClassEmbeddingIndex(8)
    index.update(ids, emb)
    pool = rng.permutation(ids)[:30]  # a subset, in pool order
    pool_emb = normalised(emb)[[ids.tolist().index(c) for c in pool]]
    got = index.select(pool, 10, np.random.default_rng(5))
    ref = [int(pool[r]) for r in reference_greedy(pool_emb, 10, np.random.default_rng(5))]
    assert got == ref


def test_selection_is_distinct_and_complete():
    emb = normalised(np.random.default_rng(1).standard_normal((25, 4)))
    for seed in range(20):
        picked = greedy_select(emb, 25, np.random.default_rng(seed))
        assert sorted(picked.tolist()) == list(range(25))
    assert greedy_select(emb, 0, np.random.default_rng(0)).shape == (0,)


# (7, 512): OpenBLAS's sgemv gives identical rows scores 1 ulp (1.2e-7) apart here,
# which an exact comparison would not call a tie (this case fails with TIE_TOL = 0).
@pytest.mark.parametrize("num, dim", [(8, 16), (7, 512)])
def test_ties_are_random_and_uniform(num, dim):
    n, seeds = 3, 2000
    emb = normalised(np.tile(np.random.default_rng(dim).standard_normal(dim), (num, 1)))
    picks = np.array([greedy_select(emb, n, np.random.default_rng(s)) for s in range(seeds)])
    assert len({tuple(p) for p in picks}) > 100  # different seeds, different selections
    for step in range(n):  # every step's tie-break is uniform, not just the first pick
        counts = np.bincount(picks[:, step], minlength=num)
        expected = seeds / num
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (step, counts)
    counts = np.bincount(picks.ravel(), minlength=num)
    assert np.all(np.abs(counts - seeds * n / num) < 5 * np.sqrt(seeds * n / num)), counts


def test_selection_is_harder_than_random():
    rng = np.random.default_rng(3)
    emb = clustered(rng, n_clusters=20, per_cluster=10, dim=32, noise=0.5)

    def mean_max_sim(rows):
        sims = emb[rows] @ emb[rows].T
        np.fill_diagonal(sims, -np.inf)
        return sims.max(axis=1).mean()

    greedy = [mean_max_sim(greedy_select(emb, 16, np.random.default_rng(s))) for s in range(30)]
    random = [mean_max_sim(np.random.default_rng(s).choice(200, 16, replace=False)) for s in range(30)]
    assert np.mean(greedy) > np.mean(random) + 0.2, (np.mean(greedy), np.mean(random))


def test_unknown_candidates_come_last_and_at_random():
    index = ClassEmbeddingIndex(4)
    known = np.arange(10)
    index.update(known, np.random.default_rng(0).standard_normal((10, 4)))
    unknown = np.arange(100, 110)
    pool = np.concatenate([unknown, known])
    picked = index.select(pool, 14, np.random.default_rng(1))
    assert sorted(picked[:10]) == known.tolist()
    assert set(picked[10:]) <= set(unknown.tolist()) and len(set(picked)) == 14
    assert set(index.select(pool, 5, np.random.default_rng(2))) <= set(known.tolist())

    empty = ClassEmbeddingIndex(4)  # version 0, e.g. a restarted actor: random
    picked = empty.select(unknown, 4, np.random.default_rng(3))
    assert len(set(picked)) == 4 and set(picked) <= set(unknown.tolist())
    assert empty.select(unknown, 4, np.random.default_rng(3)) == picked


def test_nearest_classes_matches_brute_force():
    rng = np.random.default_rng(4)
    ids = np.arange(500) * 3
    emb = clustered(rng, 50, 10, 16, 0.3)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    query = ids[:40]
    expected = ids[np.argsort(-sims[:40], axis=1)[:, :5]]
    for kind in ("flat", "ivf", "hnsw"):
        index = ClassEmbeddingIndex(16, index=kind)
        index.update(ids, emb)
        got_ids, got_sims = index.nearest_classes(query, 5)
        assert got_ids.shape == (40, 5) and got_sims.shape == (40, 5)
        assert not (got_ids == query[:, None]).any()  # a class is not its own neighbour
        recall = np.mean([len(set(g) & set(e)) / 5 for g, e in zip(got_ids, expected)])
        assert recall >= (1.0 if kind != "hnsw" else 0.9), (kind, recall)
    small = ClassEmbeddingIndex(16)
    small.update(ids[:3], emb[:3])
    got_ids, got_sims = small.nearest_classes(ids[:1], 4)
    assert got_ids[0, 2:].tolist() == [-1, -1] and np.isneginf(got_sims[0, 2:]).all()


def test_update_normalises_versions_and_snapshots_are_immutable():
    index = ClassEmbeddingIndex(3)
    assert index.version == 0
    assert index.update([5, 6], [[3.0, 0, 4.0], [0, 2.0, 0]]) == 1
    snap = index.snapshot()
    np.testing.assert_allclose(snap.embeddings, [[0.6, 0, 0.8], [0, 1, 0]], rtol=1e-6)
    assert snap.embeddings.dtype == np.float32 and snap.ids.dtype == np.int64
    with pytest.raises(ValueError):
        snap.embeddings[0, 0] = 1.0
    assert index.update([7], [[1.0, 1.0, 1.0]]) == 2
    assert snap.version == 1 and snap.ids.tolist() == [5, 6]  # the old snapshot is untouched


def test_atomic_swap_under_concurrent_updates():
    num, dim, n, versions = 3000, 32, 12, 6
    rng = np.random.default_rng(5)
    # Each version has its own embeddings AND its own id order, so a select that
    # mixed one version's id map with another's embeddings would be caught.
    id_sets = [rng.permutation(num) for _ in range(versions)]
    emb_sets = [rng.standard_normal((num, dim)).astype(np.float32) for _ in range(versions)]
    pool = np.arange(num)

    def expected(k):
        ref = ClassEmbeddingIndex(dim)
        ref.update(id_sets[k], emb_sets[k])
        return ref.select(pool, n, np.random.default_rng(0))

    expected_by_set = [expected(k) for k in range(versions)]
    assert len({tuple(e) for e in expected_by_set}) == versions

    index = ClassEmbeddingIndex(dim)
    index.update(id_sets[0], emb_sets[0])
    returned, stop = [], threading.Event()

    def writer():
        k = 1
        while not stop.is_set():
            returned.append(index.update(id_sets[k % versions], emb_sets[k % versions]))
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen, deadline = set(), time.monotonic() + 10.0
        # At least 150 selects, and on until the writer has really raced with them.
        for i in itertools.count():
            if i >= 150 and (len(returned) > 10 and len(seen) > 1 or time.monotonic() > deadline):
                break
            before = index.version
            got = index.select(pool, n, np.random.default_rng(0))
            after = index.version
            # Version v holds set (v - 1) % versions; the result must be one whole version's.
            candidates = {(v - 1) % versions for v in range(before, after + 1)}
            matches = [k for k in candidates if expected_by_set[k] == got]
            assert len(matches) == 1, (before, after, got)
            seen.add(matches[0])
    finally:
        stop.set()
        thread.join()
    assert returned == list(range(2, 2 + len(returned)))  # +1 per update, no gaps
    assert len(returned) > 10 and len(seen) > 1  # the swap really raced with select


@pytest.mark.parametrize(
    "ids, emb, match",
    [
        ([1, 2], np.ones((3, 4)), "2 class_ids but 3 embedding rows"),
        ([1, 2], np.ones((2, 5)), r"shape \(C, 4\)"),
        ([1, 1], np.ones((2, 4)), "duplicate class ids"),
        ([1, 2], [[1, np.nan, 0, 0], [1, 0, 0, 0]], "NaN"),
        ([1, 2], [[1, 0, 0, 0], [0, 0, 0, 0]], "all zeros"),
        ([1.5, 2.0], np.ones((2, 4)), "integers"),
        ([[1, 2]], np.ones((2, 4)), "1-D"),
    ],
)
def test_update_rejects_bad_input(ids, emb, match):
    index = ClassEmbeddingIndex(4)
    with pytest.raises(ValueError, match=match):
        index.update(np.asarray(ids), np.asarray(emb, dtype=np.float32))
    assert index.version == 0  # nothing was published


def test_select_and_constructor_reject_bad_input():
    index = ClassEmbeddingIndex(4)
    index.update(np.arange(5), np.eye(5, 4) + 0.1)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="n=6"):
        index.select(np.arange(5), 6, rng)
    with pytest.raises(ValueError, match="duplicate"):
        index.select([1, 1, 2], 2, rng)
    with pytest.raises(ValueError, match="1-D"):
        index.select(np.arange(4).reshape(2, 2), 2, rng)
    with pytest.raises(ValueError, match="no embedding"):
        index.nearest_classes([99], 2)
    with pytest.raises(ValueError, match="unknown index"):
        ClassEmbeddingIndex(4, index="lsh")
    with pytest.raises(ValueError, match="dim"):
        ClassEmbeddingIndex(0)
    with pytest.raises(ValueError, match="n=3"):
        greedy_select(np.eye(2, dtype=np.float32), 3, rng)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_neighbours_match_brute_force_and_leave_the_class_out(kind):
    rng = np.random.default_rng(6)
    ids = np.arange(2000) * 2 + 1
    emb = clustered(rng, 100, 20, 16, 0.3)
    index = ClassEmbeddingIndex(16, index=kind)
    index.update(ids, emb)
    recalls = []
    for q in rng.choice(2000, 30, replace=False):
        got = index.neighbours(int(ids[q]), 50)
        sims = emb @ emb[q]
        sims[q] = -np.inf
        want = ids[np.argsort(-sims)[:50]]
        assert ids[q] not in got and len(set(got.tolist())) == len(got)
        if kind == "flat":
            assert got.tolist() == want.tolist()
        recalls.append(len(set(got.tolist()) & set(want.tolist())) / 50)
    assert np.mean(recalls) >= (1.0 if kind == "flat" else 0.9), (kind, np.mean(recalls))
    assert index.neighbours(12345, 5).tolist() == []  # no embedding: no neighbours


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_merge_is_an_ema_of_rows_and_search_follows(kind):
    rng = np.random.default_rng(7)
    num, dim = 1000, 16
    ids = np.arange(num)
    base = normalised(rng.standard_normal((num, dim)))
    index = ClassEmbeddingIndex(dim, index=kind)
    assert index.update(ids, base, step=5) == 1
    assert index.version_steps == {1: 5.0}
    table = base.astype(np.float64).copy()
    steps = np.full(num, 5)
    for rnd in range(6):
        changed = rng.choice(num + 50, size=120, replace=False)  # some new classes (ids >= num)
        new = rng.standard_normal((120, dim))
        version = index.merge(changed, new, step=10 + rnd, momentum=0.5)
        assert version == 2 + rnd
        for cid, vec in zip(changed, normalised(new)):
            if cid >= len(table):
                table = np.vstack([table, np.zeros((cid - len(table) + 1, dim))])
                steps = np.concatenate([steps, np.full(cid - len(steps) + 1, -1)])
            if steps[cid] >= 0:  # known: the EMA
                mixed = 0.5 * table[cid] + 0.5 * vec
                table[cid] = mixed / np.linalg.norm(mixed)
            else:  # new: as pushed
                table[cid] = vec
            steps[cid] = 10 + rnd
    snap = index.snapshot()
    rows = snap.rows_of(np.arange(len(table)))
    known = rows >= 0
    assert (known == (steps >= 0)).all()  # new classes were added, no other
    np.testing.assert_allclose(snap.embeddings[rows[known]], table[known], atol=1e-5)
    assert snap.steps[rows[known]].tolist() == steps[known].tolist()
    assert index.version_steps[index.version] == pytest.approx(steps[known].mean())
    # Search sees the merged rows: neighbours against brute force over the merged table.
    t = table[known]
    tids = np.flatnonzero(known)
    recalls = []
    for q in rng.choice(len(tids), 20, replace=False):
        sims = t @ t[q]
        sims[q] = -np.inf
        want = set(tids[np.argsort(-sims)[:10]].tolist())
        recalls.append(len(want & set(index.neighbours(int(tids[q]), 10).tolist())) / 10)
    assert np.mean(recalls) >= (1.0 if kind == "flat" else 0.85), (kind, np.mean(recalls))


def test_merge_rejects_bad_input_and_leaves_the_version():
    index = ClassEmbeddingIndex(4)
    index.update([1, 2], np.eye(2, 4))
    with pytest.raises(ValueError, match="momentum"):
        index.merge([1], np.ones((1, 4)), step=1, momentum=1.0)
    with pytest.raises(ValueError, match="all zeros"):
        index.merge([1], np.zeros((1, 4)), step=1)
    assert index.version == 1
    assert index.merge([], np.empty((0, 4)), step=3) == 2  # an empty push is a (cheap) new version


def test_faiss_stays_on_the_cpu_without_a_reserved_gpu():
    from pipeline.mining.class_index import faiss_device

    assert faiss_device([]) is None  # the actor reserved no GPU: CPU, whatever FAISS sees
    # This machine's FAISS has no GPU support: a reserved GPU cannot be used either.
    assert faiss_device(["0"]) is None
    index = ClassEmbeddingIndex(4, device=faiss_device([]))
    index.update([1, 2, 3], np.eye(3, 4))
    assert index.snapshot().index is None and index.neighbours(1, 2).tolist() in ([2, 3], [3, 2])
