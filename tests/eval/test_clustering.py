"""NMI against scikit-learn, pairwise F1 against an explicit O(n^2) pair loop, k-means sanity."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from pipeline.eval.clustering import kmeans_assign, nmi, pairwise_f1


def _f1_reference(y, c):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(y)), 2):
        same_class, same_cluster = y[i] == y[j], c[i] == c[j]
        tp += same_class and same_cluster
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    if tp == 0:
        return 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


def _clusterings():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 12, size=200)
    yield "random", y, rng.integers(0, 9, size=200)
    noisy = y.copy()
    flip = rng.random(200) < 0.2
    noisy[flip] = rng.integers(0, 12, size=flip.sum())
    yield "noisy", y, noisy
    yield "perfect-relabelled", y, (y * 7 + 3) % 12
    yield "one-cluster", y, np.zeros(200, int)
    yield "all-singletons", y, np.arange(200)
    yield "string-labels", np.array(list("aabbbcccc")), np.array([5, 5, 5, 1, 1, 2, 2, 2, 9])


@pytest.mark.parametrize("name, y, c", list(_clusterings()), ids=lambda v: v if isinstance(v, str) else "")
def test_nmi_matches_sklearn(name, y, c):
    assert nmi(y, c) == pytest.approx(normalized_mutual_info_score(y, c), abs=1e-10)


@pytest.mark.parametrize("name, y, c", list(_clusterings()), ids=lambda v: v if isinstance(v, str) else "")
def test_pairwise_f1_matches_pair_loop(name, y, c):
    assert pairwise_f1(y, c) == pytest.approx(_f1_reference(y, c), abs=1e-12)


def test_edge_cases():
    one = np.zeros(5, int)
    assert nmi(one, one) == normalized_mutual_info_score(one, one) == 1.0
    assert nmi(one, np.arange(5)) == normalized_mutual_info_score(one, np.arange(5)) == 0.0
    assert pairwise_f1(np.arange(5), np.arange(5)) == 0.0  # no positive pairs at all


def test_large_label_space_stays_sparse():
    # 200k classes x 200k clusters would be a 4e10-cell dense table
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(200_000), 2)
    c = y.copy()
    c[rng.random(len(c)) < 0.1] = 10**9  # a junk cluster
    assert 0.0 < nmi(y, c) < 1.0
    assert 0.0 < pairwise_f1(y, c) < 1.0


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="equal length"):
        nmi(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        pairwise_f1(np.zeros(0), np.zeros(0))


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 10
    y = np.repeat(np.arange(5), 40)
    x = (centres[y] + rng.normal(scale=0.01, size=(200, 16))).astype(np.float32)
    pred = kmeans_assign(x, 5, seed=0, nredo=10)
    assert pred.shape == (200,) and pred.dtype == np.int64
    assert nmi(y, pred) == pytest.approx(1.0)
    np.testing.assert_array_equal(pred, kmeans_assign(x, 5, seed=0, nredo=10))  # seeded


def test_kmeans_bad_cluster_count_raises():
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans_assign(np.ones((3, 2), np.float32), 4, seed=0)
