"""Retrieval metrics (Recall@K, MAP@R) through exact FAISS search, in bounded memory.

Every nearest-neighbour query goes through a flat inner-product index on
L2-normalised float32 vectors (cosine similarity), searched in query chunks so
that no n x n matrix is ever built: peak memory is the embeddings, one copy in
the index and ``rows x (k + 1)`` result arrays per chunk.

Ties: FAISS orders neighbours with equal similarity arbitrarily, so a metric may
change when a same-label and a different-label item tie at the cut-off. The
reference tests use continuous random data, where ties do not occur.

The kNN helpers here (``normalize``, ``build_index``, ``iter_knn``) are shared by
``verification.py`` and ``vehicleid.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np

from pipeline.deps import import_faiss
from pipeline.eval.clustering import kmeans_assign, nmi, pairwise_f1

faiss = import_faiss()  # one clear message naming the extra when FAISS is missing

DEFAULT_CHUNK_SIZE = 8192
"""Queries per FAISS search call. FAISS blocks the BLAS work itself; the chunk
only bounds our result arrays."""

MAX_RESULT_ELEMENTS = 1 << 23
"""Cap on ``rows x k`` per chunk (8M entries, ~100 MB of ids + scores + masks), so
a large k (MAP@R with a big class) shrinks the chunk instead of the memory."""

GPU_MAX_K = 2048
"""FAISS GPU flat search supports at most this many neighbours; above it we search on CPU."""


def normalize(x: np.ndarray, *, name: str = "embeddings") -> np.ndarray:
    """Return a C-contiguous float32 copy of ``x`` (n, d) with unit-norm rows.

    All-zero rows stay zero (they get similarity 0 to everything).
    Raises ValueError if ``x`` is not 2-D or holds non-finite values.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    # row blocks keep the temporaries small (a whole-array isfinite is n x d bools)
    for start in range(0, len(out), 65536):
        if not np.isfinite(out[start : start + 65536]).all():
            raise ValueError(f"{name} contains NaN or inf values (first bad block starts at row {start})")
    faiss.normalize_L2(out)  # in place, no n x d temporary
    return out


def build_index(x: np.ndarray, *, k: int = 1) -> faiss.Index:
    """Return an exact inner-product index holding ``x`` (float32, already normalised).

    Uses a GPU index when FAISS sees a GPU and ``k`` is within the GPU limit,
    else ``faiss.IndexFlatIP``.
    """
    d = x.shape[1]
    if _num_gpus() > 0 and k <= GPU_MAX_K:
        index = faiss.GpuIndexFlatIP(_gpu_resources(), d)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(x)
    return index


def iter_knn(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    exclude_self: bool = False,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, scores, ids)`` for consecutive query chunks.

    ``scores``/``ids`` have shape (rows, k), best first. With ``exclude_self``
    the queries must be the indexed vectors in the same order: k + 1 neighbours
    are searched and query row i drops exactly index i (by id, not by score, so
    duplicate vectors elsewhere still count as neighbours). If row i is not among
    its k + 1 results (many exact duplicates tied with it), the last one is dropped.
    Raises ValueError if ``k`` is not in [1, index size (minus one with exclude_self)].
    """
    n_db = index.ntotal
    k_search = k + 1 if exclude_self else k
    if k < 1 or k_search > n_db:
        raise ValueError(f"k={k} is out of range for an index of {n_db} vectors (exclude_self={exclude_self})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = max(1, min(chunk_size, MAX_RESULT_ELEMENTS // k_search))
    for start in range(0, queries.shape[0], rows):
        q = queries[start : start + rows]
        scores, ids = index.search(q, k_search)
        if exclude_self:
            scores, ids = drop_self(scores, ids, np.arange(start, start + len(q)))
        yield start, scores, ids


def drop_self(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop one column per row: the query's own id, or the last column if it is absent."""
    drop = ids == self_ids[:, None]
    drop[:, -1] |= ~drop.any(axis=1)
    keep = ~drop
    rows, cols = ids.shape
    return scores[keep].reshape(rows, cols - 1), ids[keep].reshape(rows, cols - 1)


def recall_at_k(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[int, float]:
    """Return ``{k: Recall@K}`` under cosine similarity, each query excluded from its own results.

    Recall@K is the fraction of queries with at least one same-label item among
    their K nearest other items. Every sample is a query, including the only
    sample of a class (it can never hit); this is the usual convention of the
    metric-learning papers and keeps the denominator n. K larger than n - 1 is
    capped at n - 1. Raises ValueError on bad shapes, n < 2, empty ``ks`` or a k < 1.
    """
    if len(ks) == 0:
        raise ValueError("ks must name at least one k")
    recalls, _ = _scan(embeddings, labels, ks=ks, with_map=False, chunk_size=chunk_size)
    return recalls


def map_at_r(embeddings: np.ndarray, labels: np.ndarray, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Return MAP@R (Musgrave et al., 2020) under cosine similarity.

    For a query with R other samples of its class, MAP@R = 1/R * sum_{i<=R} P(i) * rel(i)
    over its R nearest other items; the mean is over queries with R >= 1 (a
    class with one sample is skipped). Raises ValueError on bad shapes, n < 2, or
    if no class has two samples.
    """
    _, map_r = _scan(embeddings, labels, ks=(), with_map=True, chunk_size=chunk_size)
    return map_r


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
    seed: int = 0,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Return ``recall@{k}`` for every k, ``map@r``, and ``nmi``/``f1`` of a k-means clustering.

    Recall and MAP@R share one FAISS pass (k = max(max(ks), max R) + 1). The
    clustering is spherical k-means with as many clusters as classes, seeded
    with ``seed``. Raises ValueError as ``recall_at_k`` and ``map_at_r`` do.
    """
    recalls, map_r = _scan(embeddings, labels, ks=ks, with_map=True, chunk_size=chunk_size)
    out = {f"recall@{k}": v for k, v in recalls.items()}
    out["map@r"] = map_r
    codes = _label_codes(labels, len(embeddings))
    pred = kmeans_assign(embeddings, n_clusters=int(codes.max()) + 1, seed=seed)
    out["nmi"] = nmi(codes, pred)
    out["f1"] = pairwise_f1(codes, pred)
    return out


def _label_codes(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the embeddings, got {labels.shape}")
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def _scan(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    ks: Sequence[int],
    with_map: bool,
    chunk_size: int,
) -> tuple[dict[int, float], float]:
    """One chunked leave-one-out kNN pass computing Recall@K for ``ks`` and optionally MAP@R."""
    x = normalize(embeddings)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings for leave-one-out retrieval, got {n}")
    codes = _label_codes(labels, n)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got ks={ks}")

    r_per_query = np.bincount(codes)[codes] - 1  # other samples of the query's class
    max_r = int(r_per_query.max()) if with_map else 0
    if with_map and max_r == 0:
        raise ValueError("MAP@R needs at least one class with two or more samples")
    k_search = min(max(ks + [max_r]), n - 1)

    # first_hit[i] = 0-based rank of the first same-label neighbour, k_search if none
    first_hit = np.full(n, k_search, dtype=np.int64)
    # per-query AP, summed once at the end so the result does not depend on the chunking
    ap = np.zeros(n) if with_map else None
    index = build_index(x, k=k_search + 1)
    for start, _, ids in iter_knn(index, x, k_search, chunk_size=chunk_size, exclude_self=True):
        q_codes = codes[start : start + len(ids)]
        rel = codes[ids] == q_codes[:, None]
        hit_any = rel.any(axis=1)
        first_hit[start : start + len(ids)][hit_any] = rel.argmax(axis=1)[hit_any]
        if with_map:
            ap[start : start + len(ids)] = _ap_at_r(rel, r_per_query[start : start + len(ids)])
    del index

    recalls = {k: float(np.mean(first_hit < min(k, n - 1))) for k in ks}
    map_r = float(ap[r_per_query > 0].mean()) if with_map else float("nan")
    return recalls, map_r


def _ap_at_r(rel: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Return AP@R per query (0 where R = 0), given the relevance of its ranked neighbours."""
    ranks = np.arange(1, rel.shape[1] + 1)
    within_r = ranks[None, :] <= r[:, None]
    rel = rel & within_r
    precision = np.cumsum(rel, axis=1) / ranks[None, :]
    ap = (precision * rel).sum(axis=1)
    return np.divide(ap, r, out=np.zeros(len(r)), where=r > 0)


@functools.cache
def _gpu_resources():
    # one per process: each StandardGpuResources reserves a slice of GPU memory as scratch space
    return faiss.StandardGpuResources()


def _num_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0
