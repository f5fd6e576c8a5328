"""Face verification (LFW pairs protocol) and closed-set identification metrics.

``pipeline.data.pairs.read_lfw_pairs`` parses LFW's ``pairs.txt``; the caller scores each pair
(e.g. ``cosine_scores`` of the two embeddings) and ``verification_metrics``
turns scores into 10-fold accuracy, TAR@FAR and a ROC curve. Higher score means
"more likely the same identity" throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.eval.retrieval import build_index, iter_knn, normalize


def cosine_scores(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Return the row-wise cosine similarity (float64, shape (n,)) of two (n, d) arrays.

    Raises ValueError if the shapes differ or values are not finite.
    """
    if np.shape(left) != np.shape(right):
        raise ValueError(f"left and right must have the same shape, got {np.shape(left)} and {np.shape(right)}")
    return np.einsum("ij,ij->i", normalize(left, name="left"), normalize(right, name="right"), dtype=np.float64)


def verification_metrics(
    scores: np.ndarray,
    is_same: np.ndarray,
    folds: np.ndarray,
    fars: Sequence[float] = (1e-3, 1e-4),
) -> dict:
    """Return k-fold accuracy, TAR@FAR and the ROC curve of pair scores.

    Keys:
      * ``accuracy`` / ``accuracy_std``: mean and population std (ddof=0, as in
        the LFW reference code) over folds of the test-fold accuracy, where each
        fold's threshold maximises accuracy on the other folds (``best_threshold``);
      * ``accuracy_per_fold``, ``threshold_per_fold``: float64 arrays;
      * ``tar@far=1e-03`` (one per entry of ``fars``, formatted ``{far:.0e}``),
        with ``threshold@far=...`` and ``far@far=...`` (the FAR actually achieved);
        computed on all pairs with ``tar_at_far``;
      * ``roc_fpr``, ``roc_tpr``, ``roc_thresholds``: see ``roc_curve``; ``auc``.
    Raises ValueError on mismatched shapes, non-finite scores, fewer than two
    folds, or a set without both matched and mismatched pairs.
    """
    scores, is_same = _check_scores(scores, is_same)
    folds = np.asarray(folds)
    if folds.shape != scores.shape:
        raise ValueError(f"folds must have shape {scores.shape} like scores, got {folds.shape}")
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 folds, got {len(fold_ids)}")

    acc = np.empty(len(fold_ids))
    thr = np.empty(len(fold_ids))
    for i, f in enumerate(fold_ids):
        test = folds == f
        thr[i] = best_threshold(scores[~test], is_same[~test])
        acc[i] = np.mean((scores[test] >= thr[i]) == is_same[test])

    out: dict = {
        "accuracy": float(acc.mean()),
        "accuracy_std": float(acc.std()),
        "accuracy_per_fold": acc,
        "threshold_per_fold": thr,
    }
    for far in fars:
        tar, t, achieved = tar_at_far(scores, is_same, far)
        out[f"tar@far={far:.0e}"] = tar
        out[f"threshold@far={far:.0e}"] = t
        out[f"far@far={far:.0e}"] = achieved
    fpr, tpr, thresholds = roc_curve(scores, is_same)
    out["roc_fpr"], out["roc_tpr"], out["roc_thresholds"] = fpr, tpr, thresholds
    out["auc"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return out


def _check_scores(scores: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    is_same = np.asarray(is_same, dtype=bool)
    if scores.ndim != 1 or scores.shape != is_same.shape:
        raise ValueError(f"scores and is_same must be 1-D of equal length, got {scores.shape} and {is_same.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf values")
    if is_same.all() or not is_same.any():
        raise ValueError("need both matched (is_same=True) and mismatched pairs")
    return scores, is_same


def best_threshold(scores: np.ndarray, is_same: np.ndarray) -> float:
    """Return the threshold t maximising the accuracy of "same iff score >= t".

    Candidates are the lowest score (all "same"), the midpoints between
    consecutive distinct scores, and just above the highest score (all
    "different"); this covers every distinct decision. Among equally accurate
    candidates the lowest is returned. O(n log n).
    """
    u = np.unique(scores)
    candidates = np.concatenate([u[:1], (u[:-1] + u[1:]) / 2.0, [np.nextafter(u[-1], np.inf)]])
    pos = np.sort(scores[is_same])
    neg = np.sort(scores[~is_same])
    true_accepts = len(pos) - np.searchsorted(pos, candidates, side="left")  # pos >= t
    true_rejects = np.searchsorted(neg, candidates, side="left")  # neg < t
    return float(candidates[np.argmax(true_accepts + true_rejects)])


def tar_at_far(scores: np.ndarray, is_same: np.ndarray, far: float) -> tuple[float, float, float]:
    """Return (TAR, threshold, achieved FAR) at a target false accept rate, accepting score > threshold.

    No interpolation: the threshold is the smallest one whose empirical FAR is
    <= ``far``, i.e. the impostor score with floor(far * N_impostor) impostor
    scores strictly above it. The achieved FAR is therefore never above the
    target; when far * N_impostor < 1 (e.g. 1e-4 on LFW's 3000 impostor pairs)
    it is 0 and the threshold is the highest impostor score, so the estimate is
    coarse. Raises ValueError unless 0 < far < 1.
    """
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    scores, is_same = _check_scores(scores, is_same)
    neg = np.sort(scores[~is_same])[::-1]
    threshold = float(neg[int(np.floor(far * len(neg)))])
    tar = float(np.mean(scores[is_same] > threshold))
    achieved = float(np.mean(neg > threshold))
    return tar, threshold, achieved


def roc_curve(scores: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (fpr, tpr, thresholds) for "same iff score >= threshold".

    Thresholds are the distinct scores in decreasing order preceded by +inf
    (nothing accepted), like scikit-learn's ``roc_curve(drop_intermediate=False)``.
    """
    scores, is_same = _check_scores(scores, is_same)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = is_same[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_value]
    fp = np.cumsum(~y)[last_of_value]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_value]]


def identification_rank1(
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    probe_emb: np.ndarray,
    probe_labels: np.ndarray,
    *,
    chunk_size: int = 8192,
) -> float:
    """Return closed-set rank-1 identification accuracy under cosine similarity.

    Each probe is matched to its nearest gallery embedding (FAISS exact search,
    chunked); it is correct when that gallery item has the probe's label.
    Raises ValueError on mismatched shapes or dimensions, or if a probe label is
    absent from the gallery (the set would not be closed).
    """
    g = normalize(gallery_emb, name="gallery_emb")
    p = normalize(probe_emb, name="probe_emb")
    g_labels = np.asarray(gallery_labels)
    p_labels = np.asarray(probe_labels)
    if g_labels.shape != (len(g),) or p_labels.shape != (len(p),):
        raise ValueError(
            f"labels must be 1-D and match the embeddings: gallery {g.shape} vs {g_labels.shape}, "
            f"probe {p.shape} vs {p_labels.shape}"
        )
    if g.shape[1] != p.shape[1]:
        raise ValueError(f"gallery and probe dimensions differ: {g.shape[1]} vs {p.shape[1]}")
    if len(g) == 0 or len(p) == 0:
        raise ValueError("gallery and probe sets must be non-empty")
    missing = np.setdiff1d(p_labels, g_labels)
    if len(missing):
        raise ValueError(
            f"{len(missing)} probe label(s) are not in the gallery (closed-set identification), e.g. {missing[:5].tolist()}"
        )
    index = build_index(g, k=1)
    correct = 0
    for start, _, ids in iter_knn(index, p, 1, chunk_size=chunk_size):
        correct += int(np.count_nonzero(g_labels[ids[:, 0]] == p_labels[start : start + len(ids)]))
    return correct / len(p)
