"""Class embeddings in FAISS and Sohn's greedy hard negative class mining.

Sohn (NIPS 2016, "Improved Deep Metric Learning with Multi-class N-pair Loss
Objective", section 3.2.2): embed one or two examples of a large random set of
classes, pick one class at random, then greedily add the class that most
violates the triplet constraint w.r.t. the classes already selected -- here the
candidate with the highest inner product (cosine, embeddings are L2-normalised)
to ANY selected class -- until there are N. Ties are broken at random.

This module knows nothing about Ray; `pipeline/mining/actor.py` wraps it.

Concurrency: `ClassEmbeddingIndex.update` builds a new `ClassSnapshot` off to the
side and publishes it with one reference assignment, which is atomic under the
GIL. Readers take `snapshot()` once and work only on that object, so a select
running during an update sees the old or the new embeddings, never a mix.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import faiss
import numpy as np

INDEX_KINDS = ("flat", "ivf", "hnsw")

TIE_TOL = 1e-6
"""Absolute tolerance under which two max-similarity scores count as a tie.

The scores are float32 cosines in [-1, 1]; 1e-6 is about 8 float32 ulps at 1.0.
An exact comparison is not enough: two classes with identical embeddings get
scores 1 ulp apart when BLAS routes their rows through different kernels (seen
with OpenBLAS sgemv, 7 identical rows at d=512), and Sohn's ties must then
still be random. 1e-6 leaves headroom for other BLAS builds and is far below
any similarity gap that means something for training."""


def greedy_select(
    emb: np.ndarray, n: int, rng: np.random.Generator, tie_tol: float = TIE_TOL
) -> np.ndarray:
    """Sohn's greedy class selection over the rows of `emb`.

    Step 1 draws the first row uniformly (`rng.integers(C)`); every later step
    scores each unselected row by its max similarity to any selected row and
    draws uniformly among the rows within `tie_tol` of the best score
    (`rng.integers(len(ties))`, drawn even when there is one tie, so that a
    reference implementation consumes the rng identically).

    The running `maxsim` vector is updated with one (C x d) @ (d,) product per
    pick: O(n * C * d) time, O(C) extra memory, never a C x C matrix.

    Args:
        emb: (C, d) L2-normalised embeddings, one row per candidate class.
        n: how many rows to select, 0 <= n <= C.
        rng: source of the random first pick and of the tie-breaking draws.
        tie_tol: scores within this of the best score are ties.

    Returns:
        (n,) int64 row indices into `emb`, distinct, in selection order.

    Raises:
        ValueError: `emb` is not 2-D, or n is negative or larger than C.
    """
    if emb.ndim != 2:
        raise ValueError(f"greedy_select: emb must be 2-D (C, d), got shape {emb.shape}")
    num = emb.shape[0]
    if not 0 <= n <= num:
        raise ValueError(f"greedy_select: cannot select n={n} classes from {num} candidates")
    picked = np.empty(n, dtype=np.int64)
    if n == 0:
        return picked
    picked[0] = rng.integers(num)
    maxsim = np.full(num, -np.inf, dtype=np.float32)
    sims = np.empty(num, dtype=np.float32)
    for step in range(1, n):
        np.matmul(emb, emb[picked[step - 1]], out=sims)
        np.maximum(maxsim, sims, out=maxsim)
        # Selected rows must never win again; np.maximum would revive them.
        maxsim[picked[:step]] = -np.inf
        best = maxsim.max()
        ties = np.flatnonzero(maxsim >= best - tie_tol)
        picked[step] = ties[rng.integers(len(ties))]
    return picked


@dataclass(frozen=True, eq=False)
class ClassSnapshot:
    """One immutable version of the class embeddings; never modified once published."""

    version: int
    """0 for the empty index, +1 per `ClassEmbeddingIndex.update`."""
    ids: np.ndarray
    """(C,) int64 class ids; row r of `embeddings` and of the FAISS index is class ids[r]."""
    embeddings: np.ndarray
    """(C, d) float32, L2-normalised, read-only."""
    index: faiss.Index
    """FAISS inner-product index over the rows of `embeddings` (FAISS labels are rows)."""
    _sorted_ids: np.ndarray
    _sorted_rows: np.ndarray

    @property
    def dim(self) -> int:
        """The embedding dimension d."""
        return self.embeddings.shape[1]

    def rows_of(self, class_ids: np.ndarray) -> np.ndarray:
        """Rows of `class_ids` in this snapshot, vectorised.

        Returns:
            (len(class_ids),) int64 rows, -1 where a class has no embedding here.
        """
        class_ids = np.asarray(class_ids, dtype=np.int64)
        if len(self._sorted_ids) == 0:
            return np.full(len(class_ids), -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, class_ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == class_ids
        return np.where(found, self._sorted_rows[pos], -1)

    def select(
        self, candidate_classes, n: int, rng: np.random.Generator, tie_tol: float = TIE_TOL
    ) -> list[int]:
        """Sohn's greedy step over `candidate_classes` (the pool).

        Candidates without an embedding in this snapshot (new classes since the
        last refresh, or everything after an actor restart at version 0) are
        never hard negatives for anyone: they have score -inf, so the greedy
        step runs over the known candidates only, and unknown ones fill the
        remaining places uniformly at random when the known ones run out. With
        no known candidate at all the selection is uniformly random. The
        refresher is expected to embed the whole class set, so this is rare.

        Args:
            candidate_classes: 1-D sequence of distinct int class ids.
            n: how many classes to return.
            rng: source of all random draws; same seed and pool order -> same result.
            tie_tol: see `TIE_TOL`.

        Returns:
            n distinct class ids from `candidate_classes`, in selection order.

        Raises:
            ValueError: the candidates are not 1-D or contain duplicates, or
                n is negative or larger than the number of candidates.
        """
        cand = np.asarray(candidate_classes, dtype=np.int64)
        if cand.ndim != 1:
            raise ValueError(f"select: candidate_classes must be 1-D, got shape {cand.shape}")
        if not 0 <= n <= len(cand):
            raise ValueError(
                f"select: cannot select n={n} distinct classes from {len(cand)} candidates; "
                "grow the class pool or lower N"
            )
        if len(np.unique(cand)) != len(cand):
            raise ValueError("select: candidate_classes contains duplicate class ids")
        rows = self.rows_of(cand)
        known = rows >= 0
        known_rows = rows[known]
        if len(known_rows) == len(self.ids) and np.array_equal(known_rows, np.arange(len(self.ids))):
            sub = self.embeddings  # the whole index in index order: no gathered copy
        else:
            sub = self.embeddings[known_rows]
        n_greedy = min(n, len(known_rows))
        picked = cand[known][greedy_select(sub, n_greedy, rng, tie_tol)]
        if n_greedy < n:
            rest = rng.choice(cand[~known], size=n - n_greedy, replace=False)
            picked = np.concatenate([picked, rest])
        return picked.tolist()

    def nearest_classes(self, class_ids, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k classes most similar to each of `class_ids`, by FAISS search.

        Args:
            class_ids: 1-D int class ids, each present in this snapshot.
            k: neighbours per class (the class itself is excluded).

        Returns:
            (ids, sims): (q, k) int64 class ids and (q, k) float32 inner
            products, best first; -1 / -inf where the index holds fewer than k
            other classes (or, for ivf/hnsw, found fewer).

        Raises:
            ValueError: k < 1, or a class id has no embedding in this snapshot.
        """
        if k < 1:
            raise ValueError(f"nearest_classes: k must be >= 1, got {k}")
        query = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        rows = self.rows_of(query)
        if (rows < 0).any():
            missing = query[rows < 0][:10].tolist()
            raise ValueError(
                f"nearest_classes: classes {missing} have no embedding in snapshot "
                f"version {self.version}; update the index first"
            )
        q = len(query)
        out_ids = np.full((q, k), -1, dtype=np.int64)
        out_sims = np.full((q, k), -np.inf, dtype=np.float32)
        if q == 0:
            return out_ids, out_sims
        kk = min(k + 1, len(self.ids))
        sims, labels = self.index.search(self.embeddings[rows], kk)
        for i in range(q):
            keep = (labels[i] >= 0) & (labels[i] != rows[i])
            lab, sim = labels[i][keep][:k], sims[i][keep][:k]
            out_ids[i, : len(lab)] = self.ids[lab]
            out_sims[i, : len(lab)] = sim
        return out_ids, out_sims


_GPU_RESOURCES = []


def _gpu_resources():
    """One StandardGpuResources per process, shared by every GPU index and never freed
    (FAISS recommends sharing it; each one reserves scratch GPU memory)."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def _build_faiss_index(emb: np.ndarray, kind: str) -> faiss.Index:
    """A FAISS inner-product index over `emb` rows (labels = rows).

    "flat" is exact and goes to GPU 0 when FAISS sees a GPU; "ivf" and "hnsw"
    are approximate, for >= 1M classes where exact search is too slow.
    """
    num, dim = emb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        if faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    elif kind == "ivf":
        # ~4 sqrt(C) lists, but FAISS wants >= 39 training points per list.
        nlist = max(1, min(int(4 * math.sqrt(max(num, 1))), num // 39))
        quantizer = faiss.IndexFlatIP(dim)
        # FAISS's Python wrapper keeps `quantizer` alive as long as `index`.
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if num > 0:
            index.train(emb[: max(256 * nlist, 39 * nlist)])
        index.nprobe = min(nlist, 16)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    if num > 0:
        index.add(emb)
    return index


def _make_snapshot(version: int, ids: np.ndarray, emb: np.ndarray, kind: str) -> ClassSnapshot:
    order = np.argsort(ids, kind="stable")
    ids.flags.writeable = False
    emb.flags.writeable = False
    sorted_ids = ids[order]
    sorted_ids.flags.writeable = False
    order.flags.writeable = False
    return ClassSnapshot(version, ids, emb, _build_faiss_index(emb, kind), sorted_ids, order)


class ClassEmbeddingIndex:
    """Versioned class embeddings (L2-normalised) in FAISS, with greedy selection.

    Each `update` replaces the whole class set (a refresh re-embeds every
    class); reads go through an immutable `ClassSnapshot`.
    """

    def __init__(self, dim: int, index: str = "flat"):
        """An empty index (version 0) for `dim`-dimensional embeddings.

        Raises:
            ValueError: dim < 1 or an unknown index kind.
        """
        if dim < 1:
            raise ValueError(f"ClassEmbeddingIndex: dim must be >= 1, got {dim}")
        if index not in INDEX_KINDS:
            raise ValueError(f"ClassEmbeddingIndex: unknown index {index!r}; choose one of {INDEX_KINDS}")
        self.dim = dim
        self.index_kind = index
        # Serialises writers only, so two updates cannot publish the same version.
        self._write_lock = threading.Lock()
        self._snap = _make_snapshot(
            0, np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32), index
        )

    @property
    def version(self) -> int:
        """The version of the current snapshot (0 until the first update)."""
        return self._snap.version

    def snapshot(self) -> ClassSnapshot:
        """The current immutable snapshot; keep it to read one consistent version."""
        return self._snap

    def update(self, class_ids, embeddings) -> int:
        """Replace all class embeddings with a new, atomically published version.

        Args:
            class_ids: (C,) distinct integer class ids.
            embeddings: (C, d) finite, non-zero float embeddings; normalised here.

        Returns:
            The new version number.

        Raises:
            ValueError: wrong shapes or dimension, non-integer or duplicate ids,
                NaN/inf values, or an all-zero embedding row.
        """
        ids = np.asarray(class_ids)
        emb = np.asarray(embeddings)
        if ids.ndim != 1:
            raise ValueError(f"update: class_ids must be 1-D, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"update: class_ids must be integers, got dtype {ids.dtype}")
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"update: embeddings must have shape (C, {self.dim}), got {emb.shape}")
        if emb.shape[0] != ids.shape[0]:
            raise ValueError(
                f"update: {ids.shape[0]} class_ids but {emb.shape[0]} embedding rows; "
                "they must match one to one"
            )
        ids = ids.astype(np.int64, copy=True)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"update: duplicate class ids {uniq[counts > 1][:10].tolist()}")
        emb = emb.astype(np.float32, copy=True)
        if not np.isfinite(emb).all():
            bad = ids[~np.isfinite(emb).all(axis=1)][:10].tolist()
            raise ValueError(f"update: embeddings of classes {bad} contain NaN or inf")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        if (norms == 0).any():
            bad = ids[norms[:, 0] == 0][:10].tolist()
            raise ValueError(f"update: embeddings of classes {bad} are all zeros; cannot normalise")
        emb /= norms
        with self._write_lock:
            snap = _make_snapshot(self._snap.version + 1, ids, emb, self.index_kind)
            self._snap = snap  # the single atomic publish
        return snap.version

    def select(
        self, candidate_classes, n: int, rng: np.random.Generator, tie_tol: float = TIE_TOL
    ) -> list[int]:
        """Greedy hard-class selection on the current snapshot; see `ClassSnapshot.select`."""
        return self._snap.select(candidate_classes, n, rng, tie_tol)

    def nearest_classes(self, class_ids, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS k-nearest classes on the current snapshot; see `ClassSnapshot.nearest_classes`."""
        return self._snap.nearest_classes(class_ids, k)
