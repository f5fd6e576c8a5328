"""Class embeddings in FAISS and Sohn's greedy hard negative class mining.

Sohn (NIPS 2016, "Improved Deep Metric Learning with Multi-class N-pair Loss
Objective", section 3.2.2): embed one or two examples of a large random set of
classes, pick one class at random, then greedily add the class that most
violates the triplet constraint w.r.t. the classes already selected -- here the
candidate with the highest inner product (cosine, embeddings are L2-normalised)
to ANY selected class -- until there are N. Ties are broken at random.

This module knows nothing about Ray; `pipeline/mining/actor.py` wraps it.

Concurrency: `ClassEmbeddingIndex.update` builds a new `ClassSnapshot` off to the
side and publishes it with one reference assignment; `merge` writes a few rows of
the current snapshot in place. Reads through the index (select, neighbours,
nearest_classes) hold its lock, so a select sees one whole version, never a mix,
and waits at most for a merge (O(rows merged)), never for a full rebuild.

Candidates (`pipeline.mining.selector`): Sohn's large random set, or the FAISS
nearest classes of a random seed class (`ClassSnapshot.neighbours`), for class
counts where a random set holds almost no look-alikes.
"""

from __future__ import annotations

import math
import threading

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
    emb: np.ndarray, n: int, rng: np.random.Generator, tie_tol: float = TIE_TOL, first: int | None = None
) -> np.ndarray:
    """Sohn's greedy class selection over the rows of `emb`.

    Step 1 draws the first row uniformly (`rng.integers(C)`), or takes row `first`
    when given (the seed class of a knn candidate set; no draw); every later step
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
        first: row to start from instead of a random one.

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
    if first is not None and not 0 <= first < num:
        raise ValueError(f"greedy_select: first={first} is not a row of the {num} candidates")
    picked = np.empty(n, dtype=np.int64)
    if n == 0:
        return picked
    picked[0] = rng.integers(num) if first is None else first
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


class ClassSnapshot:
    """One version line of the class embeddings: a table of L2-normalised rows and its FAISS search.

    A full `ClassEmbeddingIndex.update` builds a new snapshot off to the side and publishes
    it; the old one is never modified. `ClassEmbeddingIndex.merge` (EMA pushes, partial
    refreshes) writes the changed rows of the *current* snapshot in place, under the
    index's lock, at a cost proportional to the rows changed; readers that go through the
    index (`select`, `neighbours`, `nearest_classes`) take the same lock.

    Size: C x d float32 for the table (+ the FAISS copy for ivf/hnsw; flat searches the
    table itself) + 16 bytes per class of ids and steps: CASIA-WebFace (10.5k classes,
    d=512) ~22 MB, ~43 MB with ivf/hnsw; WebFace42M (2M classes) ~4.1 GB, ~8.2 GB.
    """

    def __init__(self, version: int, ids: np.ndarray, emb: np.ndarray, kind: str, steps: np.ndarray | None = None,
                 device: int | None = None):
        self.version = version
        """0 for the empty index, +1 per update or merge."""
        self.kind = kind
        self.device = device
        """GPU ordinal of a flat index (None: CPU; see `faiss_device`)."""
        n, dim = emb.shape
        self._n = n
        self._ids = ids.astype(np.int64, copy=True)
        self._emb = np.ascontiguousarray(emb, dtype=np.float32)
        self._steps = np.zeros(n, dtype=np.int64) if steps is None else steps.astype(np.int64, copy=True)
        order = np.argsort(self._ids, kind="stable")
        self._sorted_ids, self._sorted_rows = self._ids[order], order.astype(np.int64)
        self._changed_since_build = 0
        self._built_n = 0
        self.index: faiss.Index | None = None
        """FAISS index over the rows (labels = rows); None for a flat index on the CPU, which
        is searched with `faiss.knn` straight over the table (nothing to rebuild on a merge)."""
        self._gpu_stale = False
        self._build()

    @property
    def dim(self) -> int:
        """The embedding dimension d."""
        return self._emb.shape[1]

    def _view(self, a: np.ndarray) -> np.ndarray:
        v = a[: self._n]
        v.flags.writeable = False
        return v

    @property
    def ids(self) -> np.ndarray:
        """(C,) int64 class ids, read-only; row r of `embeddings` is class ids[r]."""
        return self._view(self._ids)

    @property
    def embeddings(self) -> np.ndarray:
        """(C, d) float32, L2-normalised, read-only."""
        return self._view(self._emb)

    @property
    def steps(self) -> np.ndarray:
        """(C,) int64: the training step each row's embedding is from (0: initial weights)."""
        return self._view(self._steps)

    def mean_step(self) -> float:
        """Mean of `steps` over the embedded classes (0.0 when there is none)."""
        return float(self._steps[: self._n].mean()) if self._n else 0.0

    def _build(self) -> None:
        """(Re)build the FAISS structure over the table: O(C d) (ivf: + k-means; hnsw: O(C log C))."""
        self.index = _build_faiss_index(self._emb[: self._n], self.kind, self.device)
        self._built_n, self._changed_since_build, self._gpu_stale = self._n, 0, False

    def rows_of(self, class_ids: np.ndarray) -> np.ndarray:
        """Rows of `class_ids` in this snapshot, vectorised.

        Returns:
            (len(class_ids),) int64 rows, -1 where a class has no embedding here.
        """
        class_ids = np.asarray(class_ids, dtype=np.int64)
        if len(self._sorted_ids) == 0:
            return np.full(class_ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, class_ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == class_ids
        return np.where(found, self._sorted_rows[pos], -1)

    def select(
        self, candidate_classes, n: int, rng: np.random.Generator, tie_tol: float = TIE_TOL,
        first: int | None = None,
    ) -> list[int]:
        """Sohn's greedy step over `candidate_classes` (the pool).

        Candidates without an embedding in this snapshot (new classes since the
        last refresh, or everything after an actor restart at version 0) are
        never hard negatives for anyone: they have score -inf, so the greedy
        step runs over the known candidates only, and unknown ones fill the
        remaining places uniformly at random when the known ones run out. With
        no known candidate at all the selection is uniformly random.

        Args:
            candidate_classes: 1-D sequence of distinct int class ids.
            n: how many classes to return.
            rng: source of all random draws; same seed and pool order -> same result.
            tie_tol: see `TIE_TOL`.
            first: a candidate class id to start the greedy step from (knn candidates:
                the seed class) instead of a random one; ignored when it has no embedding.

        Returns:
            n distinct class ids from `candidate_classes`, in selection order.

        Raises:
            ValueError: the candidates are not 1-D or contain duplicates, n is
                negative or larger than the number of candidates, or `first` is not
                a candidate.
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
        if len(known_rows) == self._n and np.array_equal(known_rows, np.arange(self._n)):
            sub = self.embeddings  # the whole index in index order: no gathered copy
        else:
            sub = self._emb[known_rows]
        start = None
        if first is not None:
            at = np.flatnonzero(cand == first)
            if not len(at):
                raise ValueError(f"select: first={first} is not one of the candidates")
            if known[at[0]]:
                start = int(np.count_nonzero(known[: at[0]]))  # its position among the known rows
        n_greedy = min(n, len(known_rows))
        picked = cand[known][greedy_select(sub, n_greedy, rng, tie_tol, first=start)]
        if n_greedy < n:
            rest = rng.choice(cand[~known], size=n - n_greedy, replace=False)
            picked = np.concatenate([picked, rest])
        return picked.tolist()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS inner-product search of `queries` (q, d) over the rows: ((q, k) sims, (q, k) rows, -1 = none)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self._n)
        if k == 0 or len(queries) == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        if self.index is None:
            return faiss.knn(queries, self._emb[: self._n], k, metric=faiss.METRIC_INNER_PRODUCT)
        if self._gpu_stale:
            self._build()  # a GPU flat copy is re-uploaded after merges, once, at the next search
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(64, k))
            return self.index.search(queries, k, params=params)
        return self.index.search(queries, k)

    def neighbours(self, class_id: int, k: int) -> np.ndarray:
        """Up to `k` class ids nearest to `class_id` (inner product), best first, itself left out.

        Returns:
            (<= k,) int64 class ids; empty when `class_id` has no embedding here (or
            ivf/hnsw found none).
        """
        row = int(self.rows_of(np.asarray([class_id]))[0])
        if row < 0 or k < 1:
            return np.empty(0, dtype=np.int64)
        _, rows = self.search(self._emb[row : row + 1], k + 1)
        rows = rows[0]
        rows = rows[(rows >= 0) & (rows != row)][:k]
        return self._ids[rows]

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
        sims, labels = self.search(self._emb[rows], k + 1)
        for i in range(q):
            keep = (labels[i] >= 0) & (labels[i] != rows[i])
            lab, sim = labels[i][keep][:k], sims[i][keep][:k]
            out_ids[i, : len(lab)] = self._ids[lab]
            out_sims[i, : len(lab)] = sim
        return out_ids, out_sims

    def _merge(self, ids: np.ndarray, emb: np.ndarray, step: int, momentum: float) -> None:
        """Write rows in place (call under the index's lock); O(k d) for k rows, plus amortised rebuilds.

        Known classes become normalise(momentum * old + (1 - momentum) * new); new classes
        are appended. FAISS follows: flat CPU needs nothing (it searches the table); a GPU
        flat copy is re-uploaded at the next search; ivf moves the changed rows (remove +
        add through a hash-table direct map) and re-trains when the table grew 4x past its
        training set; hnsw overwrites the stored vectors (the graph stays) and is rebuilt
        once as many rows changed as it holds.
        """
        rows = self.rows_of(ids)
        old = rows >= 0
        if old.any() and momentum > 0:
            mixed = momentum * self._emb[rows[old]] + (1.0 - momentum) * emb[old]
            norms = np.linalg.norm(mixed, axis=1, keepdims=True)
            # An exact reversal (norm 0) keeps the new embedding rather than dividing by zero.
            emb[old] = np.where(norms > 0, mixed / np.maximum(norms, 1e-30), emb[old])
        new_ids, new_emb = ids[~old], emb[~old]
        if old.any():
            self._emb[rows[old]] = emb[old]
            self._steps[rows[old]] = step
        first_new = self._n
        if len(new_ids):
            need = self._n + len(new_ids)
            if need > len(self._ids):
                cap = max(need, 2 * len(self._ids), 16)
                self._emb = _grown(self._emb, cap, self._n)
                self._ids = _grown(self._ids, cap, self._n)
                self._steps = _grown(self._steps, cap, self._n)
            new_rows = np.arange(self._n, need, dtype=np.int64)
            self._emb[new_rows], self._ids[new_rows], self._steps[new_rows] = new_emb, new_ids, step
            self._n = need
            # np.insert puts values at equal positions in the order given: insert in id order.
            order = np.argsort(new_ids, kind="stable")
            pos = np.searchsorted(self._sorted_ids, new_ids[order])
            self._sorted_ids = np.insert(self._sorted_ids, pos, new_ids[order])
            self._sorted_rows = np.insert(self._sorted_rows, pos, new_rows[order])
        self._changed_since_build += int(old.sum())
        if self.index is None:
            return
        if self.kind == "flat":
            self._gpu_stale = True
        elif self.kind == "ivf":
            if self._n > 4 * max(self._built_n, 39) or self._built_n == 0:
                self._build()
                return
            changed = rows[old]
            if len(changed):
                self.index.remove_ids(changed)
                self.index.add_with_ids(self._emb[changed], changed)
            if self._n > first_new:
                add = np.arange(first_new, self._n, dtype=np.int64)
                self.index.add_with_ids(self._emb[add], add)
        else:  # hnsw
            if self._changed_since_build >= max(self._built_n, 1):
                self._build()
                return
            if old.any():
                stored = faiss.rev_swig_ptr(faiss.downcast_index(self.index.storage).get_xb(),
                                            self._built_n * self.dim)
                stored = stored.reshape(self._built_n, self.dim)
                changed = rows[old]
                inside = changed < self._built_n
                stored[changed[inside]] = self._emb[changed[inside]]
            if self._n > self.index.ntotal:
                self.index.add(self._emb[self.index.ntotal : self._n])
                self._built_n = self.index.ntotal


def _grown(a: np.ndarray, cap: int, n: int) -> np.ndarray:
    out = np.empty((cap,) + a.shape[1:], dtype=a.dtype)
    out[:n] = a[:n]
    return out


_GPU_RESOURCES = []


def _gpu_resources():
    """One StandardGpuResources per process, shared by every GPU index and never freed
    (FAISS recommends sharing it; each one reserves scratch GPU memory)."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def faiss_device(gpu_ids) -> int | None:
    """Where this process may put a FAISS GPU index: the GPU ordinal, or None for the CPU.

    `gpu_ids` are the GPUs Ray reserved for the calling actor (`ray.get_gpu_ids()`). A
    GPU is used only when the actor reserved one (a fraction is enough) and FAISS was built
    with GPU support and sees a device. Ray sets CUDA_VISIBLE_DEVICES of such an actor to
    its reserved GPU(s), so the first one is ordinal 0. An actor that reserved none gets
    None even when FAISS sees GPUs: those belong to the training workers.
    """
    if not list(gpu_ids):
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    return 0


def _build_faiss_index(emb: np.ndarray, kind: str, device: int | None = None) -> faiss.Index | None:
    """A FAISS inner-product index over `emb` rows (labels = rows); None for flat on the CPU.

    "flat" is exact: on the CPU `faiss.knn` searches the table itself (no copy to keep
    current), on GPU `device` it is a GPU copy. "ivf" and "hnsw" are approximate, for
    >= 1M classes where exact search is too slow; always on the CPU.
    """
    num, dim = emb.shape
    if kind == "flat":
        if device is None:
            return None
        index = faiss.index_cpu_to_gpu(_gpu_resources(), device, faiss.IndexFlatIP(dim))
    elif kind == "ivf":
        # ~sqrt(C) lists (FAISS wants >= 39 training points per list), trained on <= 64 points
        # per list: k-means costs ~nlist x points x d x 25, so 4 sqrt(C) lists on 256 points
        # each took minutes at 1M classes on 2 cores; sqrt(C) lists x 64 trains in seconds, and
        # a query (16 lists probed) still scans only ~16 / sqrt(C) of the classes.
        nlist = max(1, min(int(math.sqrt(max(num, 1))), num // 39))
        quantizer = faiss.IndexFlatIP(dim)
        # FAISS's Python wrapper keeps `quantizer` alive as long as `index`.
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if num > 0:
            # Spread over the table (a strided sample): classes may arrive sorted by anything.
            index.train(np.ascontiguousarray(emb[:: max(1, num // (64 * nlist))][: 64 * nlist]))
        index.nprobe = min(nlist, 16)
        # Merges move single rows: a hash-table direct map makes remove_ids O(rows removed).
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        if num > 0:
            index.add_with_ids(emb, np.arange(num, dtype=np.int64))
        return index
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    if num > 0:
        index.add(emb)
    return index


def _checked(dim: int, class_ids, embeddings, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (int64 ids, L2-normalised float32 rows); raises ValueError naming the problem."""
    ids = np.asarray(class_ids)
    emb = np.asarray(embeddings)
    if ids.ndim != 1:
        raise ValueError(f"{what}: class_ids must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what}: class_ids must be integers, got dtype {ids.dtype}")
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise ValueError(f"{what}: embeddings must have shape (C, {dim}), got {emb.shape}")
    if emb.shape[0] != ids.shape[0]:
        raise ValueError(
            f"{what}: {ids.shape[0]} class_ids but {emb.shape[0]} embedding rows; "
            "they must match one to one"
        )
    ids = ids.astype(np.int64, copy=True)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what}: duplicate class ids {uniq[counts > 1][:10].tolist()}")
    emb = emb.astype(np.float32, copy=True)
    if not np.isfinite(emb).all():
        bad = ids[~np.isfinite(emb).all(axis=1)][:10].tolist()
        raise ValueError(f"{what}: embeddings of classes {bad} contain NaN or inf")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = ids[norms[:, 0] == 0][:10].tolist()
        raise ValueError(f"{what}: embeddings of classes {bad} are all zeros; cannot normalise")
    emb /= norms
    return ids, emb


class ClassEmbeddingIndex:
    """Versioned class embeddings (L2-normalised) in FAISS, with greedy selection.

    `update` replaces the whole class set (a full refresh re-embeds every class) with a
    new snapshot; `merge` changes some rows of the current one in place (EMA pushes,
    refreshes of a share of the classes), at a cost proportional to the rows changed.
    Every version remembers the mean training step of its rows (`version_steps`, the
    last 256 versions), so users can say how old the embeddings behind a selection were.
    """

    def __init__(self, dim: int, index: str = "flat", device: int | None = None):
        """An empty index (version 0) for `dim`-dimensional embeddings.

        `device`: GPU ordinal for a flat index (`faiss_device`); None = CPU.

        Raises:
            ValueError: dim < 1 or an unknown index kind.
        """
        if dim < 1:
            raise ValueError(f"ClassEmbeddingIndex: dim must be >= 1, got {dim}")
        if index not in INDEX_KINDS:
            raise ValueError(f"ClassEmbeddingIndex: unknown index {index!r}; choose one of {INDEX_KINDS}")
        self.dim = dim
        self.index_kind = index
        self.device = device
        # _write_lock serialises writers (versions are +1 each, in order); _lock guards the
        # current snapshot: readers against in-place merges and the publish of a new one.
        # A full update builds outside _lock, so selects never wait for a rebuild.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._snap = ClassSnapshot(0, np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32), index,
                                   device=device)
        self.version_steps: dict[int, float] = {}
        """version -> mean training step of its rows, for the last 256 versions."""

    @property
    def version(self) -> int:
        """The version of the current snapshot (0 until the first update)."""
        return self._snap.version

    def snapshot(self) -> ClassSnapshot:
        """The current snapshot; a later `update` leaves it as it is, a `merge` writes into it."""
        return self._snap

    def _published(self, snap: ClassSnapshot) -> int:
        self.version_steps[snap.version] = snap.mean_step()
        if len(self.version_steps) > 256:
            del self.version_steps[min(self.version_steps)]
        return snap.version

    def update(self, class_ids, embeddings, step: int = 0) -> int:
        """Replace all class embeddings with a new, atomically published version.

        Args:
            class_ids: (C,) distinct integer class ids.
            embeddings: (C, d) finite, non-zero float embeddings; normalised here.
            step: the training step of the weights they were computed with.

        Returns:
            The new version number.

        Raises:
            ValueError: wrong shapes or dimension, non-integer or duplicate ids,
                NaN/inf values, or an all-zero embedding row.
        """
        ids, emb = _checked(self.dim, class_ids, embeddings, "update")
        steps = np.full(len(ids), int(step), dtype=np.int64)
        with self._write_lock:
            snap = ClassSnapshot(self._snap.version + 1, ids, emb, self.index_kind, steps, self.device)
            with self._lock:
                self._snap = snap  # the single atomic publish
                return self._published(snap)

    def merge(self, class_ids, embeddings, step: int, momentum: float = 0.0) -> int:
        """Change the rows of `class_ids` (new classes are added); returns the new version.

        `momentum` 0 replaces a known class's row; in (0, 1) it becomes the normalised
        exponential moving average `momentum * old + (1 - momentum) * new`. Cost: O(k d)
        for k rows (plus amortised FAISS rebuilds, see `ClassSnapshot._merge`), never a
        copy of the whole table.

        Raises:
            ValueError: as `update`, or momentum outside [0, 1).
        """
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"merge: momentum must be in [0, 1), got {momentum}")
        ids, emb = _checked(self.dim, class_ids, embeddings, "merge")
        with self._write_lock, self._lock:
            self._snap._merge(ids, emb, int(step), float(momentum))
            self._snap.version += 1
            return self._published(self._snap)

    def table(self, since: int = -1) -> tuple[int, np.ndarray, np.ndarray] | None:
        """``(version, ids, embeddings)``: copies of the current snapshot's table; None when its version is ``since``.

        For a copy kept elsewhere (the planner's, ``pipeline.mining.actor.TableCopyClient``):
        C x (8 + 4 d) bytes, 21.6 MB at CASIA-WebFace (10.5k classes, d = 512), 4.1 GB at
        WebFace42M (2M classes), which is why copies are only made of small tables.
        """
        with self._lock:
            snap = self._snap
            if snap.version == since:
                return None
            return snap.version, snap.ids.copy(), snap.embeddings.copy()

    def select(
        self, candidate_classes, n: int, rng: np.random.Generator, tie_tol: float = TIE_TOL,
        first: int | None = None,
    ) -> list[int]:
        """Greedy hard-class selection on the current snapshot; see `ClassSnapshot.select`."""
        with self._lock:
            return self._snap.select(candidate_classes, n, rng, tie_tol, first)

    def neighbours(self, class_id: int, k: int) -> np.ndarray:
        """FAISS nearest classes of one class on the current snapshot; see `ClassSnapshot.neighbours`."""
        with self._lock:
            return self._snap.neighbours(class_id, k)

    def nearest_classes(self, class_ids, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS k-nearest classes on the current snapshot; see `ClassSnapshot.nearest_classes`."""
        with self._lock:
            return self._snap.nearest_classes(class_ids, k)
