"""The hard negative class miner as the batch planner's selector (Sohn 2016's greedy step).

Per step, a candidate set of C = ``miner.pool_classes`` *active* classes (classes with at
least M unused samples this pass), then Sohn's greedy selection of N mutually hard classes
among them, by the miner actor (``pipeline.mining.actor.MinerClient``: random when the miner
does not answer in time, counted as ``fallbacks``) or, with ``miner.select_at: planner``, here
on a copy of the miner's class table that is refreshed every few steps without waiting
(``TableCopyClient``: no actor call per step; ``auto``, the default, copies tables of up to
64 MiB, 32k classes at d = 512). With C <= N every candidate is taken.

``miner.candidates``:

* ``random``: C classes drawn uniformly from all active classes (Sohn's "large random set").
* ``knn``: a seed class drawn uniformly from the active classes, and its C - 1 nearest
  active classes by FAISS over all class embeddings (``MinerActor.neighbours``); the greedy
  step starts from the seed. Inactive classes are excluded by over-fetching: the miner
  returns about (C - 1) x (all classes / active classes) x 1.25 neighbours and the
  selector keeps the active ones (``remaining >= M``, the planner's own test). Why not a
  FAISS ``IDSelector``: the miner would need the active set at every step, O(classes) to
  build and ship (250 kB per step as a bitmap at 2M classes), while over-fetching costs
  O(C / active share) and needs no state kept in step with the planner's rewinds. A seed
  without an embedding yet, or too few active neighbours (the end of a pass, ivf/hnsw
  finding fewer), leaves places that are drawn uniformly from the active classes, counted
  in ``filled`` (the miner keeps the count: ``MinerActor.stats``).

Cost per step: random, O(C) here plus the greedy step (O(N C d)); knn, one FAISS query for
k ~ 1.25 C neighbours (flat: O(classes x d); ivf/hnsw: sublinear). With ``select_at: miner``
each of them is an actor call (select; knn also neighbours); with ``planner`` they run here
on the copy (knn: an exact flat search over it) and one table call is sent every
``table_every`` steps. Memory: the class labels
sorted (16 bytes per class: 0.2 MB at CASIA-WebFace, 32 MB at WebFace42M), plus with
``planner`` the table copy (C x (24 + 4 d) bytes: 21.8 MB at CASIA-WebFace, d = 512; a
WebFace42M-sized table, 4.1 GB, is left in the miner by ``auto``).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.mining.actor import LOCAL_TABLE_MAX_BYTES, MinerClient, TableCopyClient

OVERFETCH = 1.25
"""Margin on the expected number of neighbours needed to find C - 1 active ones."""


class MinedSelector:
    """A :class:`pipeline.data.planner.Selector` backed by the miner actor ``miner``.

    ``images_per_class``: M, the planner's bar for an active class (``remaining >= M``).
    ``client``: what answers ``neighbours`` and ``select`` (default: a ``MinerClient`` of the
    actor ``miner``; ``bench/bench_mining.py`` passes one over an in-process index).
    """

    def __init__(self, labels: np.ndarray, miner: str, pool_classes: int, timeout_s: float = 2.0,
                 candidates: str = "random", images_per_class: int = 2, client=None,
                 warmup_steps: int = 0, select_at: str = "miner", dim: int = 0, table_every: int = 5) -> None:
        if candidates not in ("random", "knn"):
            raise ValueError(f"miner.candidates must be 'random' or 'knn', got {candidates!r}")
        if select_at not in ("auto", "planner", "miner"):
            raise ValueError(f"miner.select_at must be 'auto', 'planner' or 'miner', got {select_at!r}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self._order = np.argsort(self.labels, kind="stable")
        self._sorted = self.labels[self._order]
        if select_at == "auto":
            select_at = "planner" if len(self.labels) * (8 + 4 * dim) <= LOCAL_TABLE_MAX_BYTES else "miner"
        self.select_at = select_at
        """Where selections are made: ``planner`` (on a copy of the class table, `TableCopyClient`) or ``miner``."""
        if client is None and select_at == "planner":
            if dim < 1:
                raise ValueError("MinedSelector: select_at 'planner' needs the embedding size (dim)")
            client = TableCopyClient(miner, dim, timeout_s=timeout_s, every=table_every)
        self.client = client if client is not None else MinerClient(miner, timeout_s=timeout_s)
        self.pool_classes = int(pool_classes)
        self.candidates = candidates
        self.images_per_class = int(images_per_class)
        self.filled = 0
        """knn candidates drawn at random (seed without embedding, too few active neighbours)."""
        self.warmup_steps = int(warmup_steps)
        self.step = 0
        """The step being planned; the planner actor sets it before each plan (``miner.warmup_steps``)."""

    @property
    def warming(self) -> bool:
        """True while :attr:`step` is within ``miner.warmup_steps``: classes are drawn uniformly, the miner is not asked."""
        return self.step < self.warmup_steps

    @property
    def last_version(self) -> int:
        """The miner's index version behind the last selection (-1: a random fallback or a warm-up step)."""
        return -1 if self.warming else self.client.last_version

    @property
    def fallbacks(self) -> int:
        """Selections drawn at random because the miner did not answer."""
        return self.client.fallbacks

    def index_of(self, class_ids: np.ndarray) -> np.ndarray:
        """Class indices (positions in ``labels``) of ``class_ids``; -1 for an unknown id."""
        class_ids = np.asarray(class_ids, dtype=np.int64)
        if not len(self._sorted):
            return np.full(class_ids.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, class_ids), len(self._sorted) - 1)
        return np.where(self._sorted[pos] == class_ids, self._order[pos], -1)

    def __call__(self, active: np.ndarray, n: int, rng: np.random.Generator, remaining: np.ndarray) -> np.ndarray:
        """``n`` distinct class indices of ``active``: the miner's greedy pick among the candidates
        (uniform during ``miner.warmup_steps``, as the planner without a miner draws them)."""
        if self.warming:
            from pipeline.data.planner import select_uniform

            return select_uniform(active, n, rng, remaining)
        c = min(max(self.pool_classes, n), active.size)
        if self.candidates == "knn":
            cand, filled = self.knn_candidates(active, c, rng, remaining)
            chosen = self.client.select(self.labels[cand], n, rng, first=int(self.labels[cand[0]]), filled=filled)
        else:
            cand = active[rng.choice(active.size, size=c, replace=False)]
            chosen = self.client.select(self.labels[cand], n, rng)
        return self.index_of(np.asarray(chosen, dtype=np.int64))

    def knn_candidates(self, active: np.ndarray, c: int, rng: np.random.Generator,
                       remaining: np.ndarray) -> tuple[np.ndarray, int]:
        """The seed (first) and its ``c - 1`` nearest active classes, as class indices; and how many were filled at random.

        Draws: the seed (``rng.integers``), then, only when places are left, one
        ``rng.choice`` over the active classes.
        """
        seed = int(active[rng.integers(active.size)])
        want = c - 1
        cand = np.asarray([seed], dtype=np.int64)
        if want > 0:
            k = min(len(self.labels) - 1, math.ceil(want * len(self.labels) / active.size * OVERFETCH) + 1)
            near = self.client.neighbours(int(self.labels[seed]), k)
            if near is not None and len(near):
                idx = self.index_of(near)
                idx = idx[(idx >= 0) & (idx != seed)]
                idx = idx[remaining[idx] >= self.images_per_class][:want]
                cand = np.concatenate([cand, idx])
        need = c - len(cand)
        if need > 0:
            # Distinct active classes, as many as needed plus those already taken: enough are left after removing them.
            extra = active[rng.choice(active.size, size=min(active.size, need + len(cand)), replace=False)]
            extra = extra[~np.isin(extra, cand)][:need]
            cand = np.concatenate([cand, extra])
            self.filled += need
        return cand.astype(np.int64), max(need, 0)
