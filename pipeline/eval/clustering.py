"""Clustering quality of embeddings: spherical k-means (FAISS), NMI and pairwise F1.

NMI and F1 are computed from the sparse contingency table (the non-empty
(class, cluster) cells, found with one ``np.unique``), so 100k classes x 100k
clusters never allocate a dense k x k table and no pair of samples is enumerated.
"""

from __future__ import annotations

import numpy as np

from pipeline.deps import import_faiss

faiss = import_faiss()  # one clear message naming the extra when FAISS is missing

ASSIGN_CHUNK = 65536
"""Vectors per nearest-centroid search when assigning clusters."""


def kmeans_assign(
    embeddings: np.ndarray, n_clusters: int, seed: int, niter: int = 20, *, nredo: int = 1
) -> np.ndarray:
    """Return an int64 cluster id per row from spherical k-means on the L2-normalised embeddings.

    Uses ``faiss.Kmeans`` (GPU when FAISS sees one), initialised from random
    points, so a run can stop in a local minimum; ``nredo`` > 1 keeps the best
    of several runs. FAISS subsamples at most 256 points per centroid for
    training; every row is then assigned to its nearest centroid by inner
    product. Raises ValueError unless 1 <= n_clusters <= n.
    """
    x = np.array(embeddings, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite 2-D (n, d) array, got shape {x.shape}")
    faiss.normalize_L2(x)  # in place; all-zero rows stay zero
    n, d = x.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}] for {n} embeddings, got {n_clusters}")
    km = faiss.Kmeans(
        d,
        int(n_clusters),
        niter=int(niter),
        nredo=int(nredo),
        seed=int(seed),
        spherical=True,
        gpu=getattr(faiss, "get_num_gpus", lambda: 0)() > 0,
        verbose=False,
        # evaluation often has ~10 samples per class; silence FAISS's "too few points" warning
        min_points_per_centroid=1,
    )
    km.train(x)
    index = faiss.IndexFlatIP(d)
    index.add(km.centroids)
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, ASSIGN_CHUNK):
        _, ids = index.search(x[start : start + ASSIGN_CHUNK], 1)
        out[start : start + ASSIGN_CHUNK] = ids[:, 0]
    return out


def _contingency(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (class sizes, cluster sizes, non-empty cell counts) as int64 arrays."""
    a = np.asarray(labels_true)
    b = np.asarray(labels_pred)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"labels_true and labels_pred must be 1-D of equal length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("labels_true and labels_pred are empty")
    ca = np.unique(a, return_inverse=True)[1].reshape(-1).astype(np.int64)
    cb = np.unique(b, return_inverse=True)[1].reshape(-1).astype(np.int64)
    n_b = int(cb.max()) + 1
    cells = np.unique(ca * n_b + cb, return_counts=True)[1]
    return np.bincount(ca), np.bincount(cb), cells


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts / n
    return float(-(p * np.log(p)).sum())


def nmi(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Return normalised mutual information, MI / mean(H(true), H(pred)).

    Matches scikit-learn's ``normalized_mutual_info_score`` (arithmetic mean),
    including its edge cases: 1.0 when both labelings have a single group, 0.0
    when the MI is zero. Raises ValueError on empty or mismatched inputs.
    """
    class_sizes, cluster_sizes, cells = _contingency(labels_true, labels_pred)
    n = int(class_sizes.sum())
    if len(class_sizes) == len(cluster_sizes) == 1:
        return 1.0
    # MI = sum_ij p_ij log(p_ij / (p_i p_j)) = H(true) + H(pred) - H(joint)
    h_true = _entropy(class_sizes, n)
    h_pred = _entropy(cluster_sizes, n)
    mi = max(h_true + h_pred - _entropy(cells, n), 0.0)
    if mi == 0.0:
        return 0.0
    return float(mi / max((h_true + h_pred) / 2.0, np.finfo(np.float64).eps))


def _pairs(counts: np.ndarray) -> int:
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pairwise_f1(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Return the pairwise F1 of a clustering (Song et al., 2016).

    Over all unordered pairs of samples, a pair is predicted positive when both
    fall in one cluster and is truly positive when both share a class;
    F1 = 2PR / (P + R). Counted from the contingency table, O(n log n).
    Returns 0.0 when there are no predicted or no true positive pairs.
    Raises ValueError on empty or mismatched inputs.
    """
    class_sizes, cluster_sizes, cells = _contingency(labels_true, labels_pred)
    tp = _pairs(cells)
    pred_pos = _pairs(cluster_sizes)
    true_pos = _pairs(class_sizes)
    if tp == 0 or pred_pos == 0 or true_pos == 0:
        return 0.0
    precision = tp / pred_pos
    recall = tp / true_pos
    return float(2 * precision * recall / (precision + recall))
