"""Recall@K and MAP@R against a brute-force float64 reference (full similarity matrix, explicit loops)."""

import numpy as np
import pytest

from pipeline.eval.clustering import kmeans_assign, nmi, pairwise_f1
from pipeline.eval.retrieval import map_at_r, recall_at_k, retrieval_metrics

KS = (1, 2, 4, 8)


def _data(seed, n=300, n_classes=30, d=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, n_classes, size=n)
    return x, y


def _ranked_neighbours(x):
    """Per query, all other rows sorted by decreasing float64 cosine similarity."""
    x = x.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    out = []
    for i in range(len(x)):
        order = [j for j in np.argsort(-sim[i], kind="stable") if j != i]
        out.append(order)
    return out


def _recall_reference(x, y, ks):
    ranked = _ranked_neighbours(x)
    return {k: float(np.mean([any(y[j] == y[i] for j in ranked[i][:k]) for i in range(len(x))])) for k in ks}


def _map_at_r_reference(x, y):
    ranked = _ranked_neighbours(x)
    aps = []
    for i in range(len(x)):
        r = int(np.sum(y == y[i])) - 1
        if r == 0:
            continue
        hits, ap = 0, 0.0
        for rank, j in enumerate(ranked[i][:r], start=1):
            if y[j] == y[i]:
                hits += 1
                ap += hits / rank
        aps.append(ap / r)
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed):
    x, y = _data(seed)
    got = recall_at_k(x, y, KS)
    want = _recall_reference(x, y, KS)
    assert got.keys() == want.keys()
    for k in KS:
        assert got[k] == pytest.approx(want[k], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_at_r_matches_brute_force(seed):
    x, y = _data(seed)
    assert map_at_r(x, y) == pytest.approx(_map_at_r_reference(x, y), abs=1e-6)


def test_map_at_r_skips_singletons_and_handles_uneven_classes():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = np.r_[np.zeros(40, int), np.ones(5, int), np.arange(2, 77)]  # one big class, one small, 75 singletons
    assert map_at_r(x, y) == pytest.approx(_map_at_r_reference(x, y), abs=1e-6)


def test_chunking_is_invisible():
    x, y = _data(3)
    one = retrieval_metrics(x, y, chunk_size=10**6)
    for chunk in (1, 7, 64):
        assert retrieval_metrics(x, y, chunk_size=chunk) == one


def test_self_excluded_by_index_not_by_score():
    # 20 identical vectors with distinct labels: a query's nearest "other" items are its
    # copies (all other labels), so no hit is possible -- unless the query itself leaks in.
    rng = np.random.default_rng(0)
    dup = np.tile(rng.normal(size=(1, 8)), (20, 1))
    far = -dup[:5] + rng.normal(scale=0.01, size=(5, 8))
    x = np.vstack([dup, far]).astype(np.float32)
    y = np.r_[np.arange(20), 100 + np.arange(5)]
    rec = recall_at_k(x, y, ks=(1, 8))
    # copies never hit within 8 (their 19 twins come first); the far points have unique labels
    assert rec == {1: 0.0, 8: 0.0}


def test_duplicate_of_same_label_counts_as_hit():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(10, 8))
    x = np.vstack([base, base]).astype(np.float32)  # every vector twice
    y = np.r_[np.arange(10), np.arange(10)]
    assert recall_at_k(x, y, ks=(1,)) == {1: 1.0}
    assert map_at_r(x, y) == pytest.approx(1.0)


def test_k_capped_at_n_minus_one():
    x, y = _data(4, n=6, n_classes=2)
    rec = recall_at_k(x, y, ks=(1, 5, 100))
    assert rec[100] == rec[5] == _recall_reference(x, y, (5,))[5]


def test_retrieval_metrics_keys_and_values():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 10
    y = np.repeat(np.arange(5), 20)
    x = (centres[y] + rng.normal(scale=0.01, size=(100, 16))).astype(np.float32)
    m = retrieval_metrics(x, y, ks=(1, 2, 4, 8), seed=3)
    assert set(m) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi", "f1"}
    assert all(m[k] == 1.0 for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"))
    # clustering: k-means with one cluster per class and the given seed
    pred = kmeans_assign(x, 5, seed=3)
    assert m["nmi"] == pytest.approx(nmi(y, pred))
    assert m["f1"] == pytest.approx(pairwise_f1(y, pred))


@pytest.mark.parametrize(
    "x, y, match",
    [
        (np.zeros((3,)), np.zeros(3), "2-D"),
        (np.zeros((3, 2)), np.zeros(4), r"shape \(3,\)"),
        (np.zeros((1, 2)), np.zeros(1), "at least 2"),
        (np.full((3, 2), np.nan), np.zeros(3), "NaN"),
    ],
)
def test_bad_input_raises(x, y, match):
    with pytest.raises(ValueError, match=match):
        recall_at_k(x, y)


def test_bad_k_and_no_pairs_raise():
    x, y = _data(0, n=10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k(x, y, ks=(0,))
    with pytest.raises(ValueError, match="two or more samples"):
        map_at_r(x, np.arange(10))
