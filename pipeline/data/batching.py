"""N-pair / M-per-class batch composition from a pool of classes.

Ray Data cannot sample by class, so batches are made before the trainer sees them: the
composer keeps a pool of about C classes (Sohn's "large random set of classes") filled
from the class-grouped stream, asks a :class:`ClassSelector` for the classes of the next
global batch, takes M images of each, and cuts the global batch into one batch per rank.
Classes whose images are used up leave the pool; new shards refill it.

This module knows nothing of Ray, FAISS or torch: the stream wraps it in a Ray Data UDF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np


class ClassSelector(Protocol):
    """Chooses ``n`` distinct classes out of ``candidates`` (the pool's ready classes)."""

    def select(self, candidates: list[int], n: int, rng: np.random.Generator) -> list[int]: ...


class RandomSelector:
    """Uniformly random classes: the baseline without mining."""

    def select(self, candidates: list[int], n: int, rng: np.random.Generator) -> list[int]:
        """Return ``n`` distinct classes drawn uniformly from ``candidates``."""
        return [int(c) for c in rng.choice(np.asarray(candidates), size=n, replace=False)]


def _distinct(n: int, u: list[float]) -> list[int]:
    """``len(u)`` distinct indices below ``n``, uniformly, from uniforms ``u`` in [0, 1):
    the j-th draw picks among the ``n - j`` indices not taken yet."""
    taken: list[int] = []
    for j, x in enumerate(u):
        i = int(x * (n - j))
        for t in sorted(taken):  # map i to the i-th index not taken
            if i >= t:
                i += 1
        taken.append(i)
    return taken


class BatchComposer:
    """Assembles batches of ``classes_per_rank * num_ranks`` distinct classes x ``images_per_class``.

    ``add`` feeds decoded samples; ``compose`` returns the finished per-rank batches as
    ``(images, labels)`` arrays of shape ``(R, K*M, ...)`` and ``(R, K*M)`` where R is a
    multiple of ``num_ranks``: each consecutive group of ``num_ranks`` rows is one global
    batch with no class repeated. Within a row, the M images of a class are consecutive.
    """

    def __init__(
        self,
        classes_per_rank: int,
        images_per_class: int,
        pool_classes: int,
        num_ranks: int = 1,
        selector: ClassSelector | None = None,
        seed: int = 0,
    ) -> None:
        if classes_per_rank < 1 or num_ranks < 1:
            raise ValueError("classes_per_rank and num_ranks must be >= 1")
        self.k = classes_per_rank
        self.m = images_per_class
        self.ranks = num_ranks
        self.n_global = classes_per_rank * num_ranks
        if self.n_global < 2:
            raise ValueError("a batch needs at least 2 distinct classes")
        self.pool_target = max(pool_classes, self.n_global)
        self.selector = selector or RandomSelector()
        self.rng = np.random.default_rng(seed)
        self.pool: dict[int, list] = {}
        self.dropped = 0
        """Images that left the pool unused (a class's last image when fewer than M remain)."""
        self.on_drop: Callable[[list], None] | None = None
        """Called with the items of each class that leaves the pool unused (see ``dropped``)."""
        self.batches = 0

    def add(self, images, labels) -> None:
        """Put samples into the pool (``images[i]`` has class ``labels[i]``; any items, not only arrays)."""
        for img, lab in zip(images, labels):
            self.pool.setdefault(int(lab), []).append(img)

    def _ready(self) -> list[int]:
        return [c for c, imgs in self.pool.items() if len(imgs) >= self.m]

    def compose(self, final: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Emit every global batch the pool can make now.

        While streaming, a batch is drawn only when at least ``pool_classes`` classes are
        ready, so each choice is made from a full pool; with ``final`` the pool is drained
        down to fewer than N ready classes. Returns lists of per-rank image and label arrays
        (the images stacked; see :meth:`compose_items` for items that are not arrays).
        """
        xs, ys = self.compose_items(final)
        return [np.stack(x) for x in xs], ys

    def compose_items(self, final: bool = False, before_batch: Callable[[int], None] | None = None,
                      max_batches: int | None = None) -> tuple[list[list], list[np.ndarray]]:
        """Like :meth:`compose`, for pools of any items (JPEG bytes, ids...): returns per-rank
        lists of K*M items and label arrays. ``before_batch(batches made so far)`` is called
        before each global batch's classes are selected (the stream's trainer gate waits
        there); at most ``max_batches`` global batches are made (None: all the pool allows).
        """
        out_x, out_y = [], []
        made = 0
        while max_batches is None or made < max_batches:
            ready = self._ready()
            if len(ready) < (self.n_global if final else self.pool_target):
                break
            if before_batch is not None:
                before_batch(self.batches)
            chosen = self.selector.select(sorted(ready), self.n_global, self.rng)
            if len(chosen) != self.n_global or len(set(chosen)) != self.n_global or not set(chosen) <= set(ready):
                raise RuntimeError(f"class selector returned {chosen!r}: expected {self.n_global} distinct ready classes")
            # One draw for the whole batch: Generator.choice(replace=False) per class cost ~15 us,
            # a quarter of the composer's time per image (py-spy, bench/bench_data.py).
            u = self.rng.random((self.n_global, self.m)).tolist()
            for r in range(self.ranks):
                xs, ys = [], []
                for j, c in enumerate(chosen[r * self.k : (r + 1) * self.k]):
                    imgs = self.pool[c]
                    take = sorted(_distinct(len(imgs), u[r * self.k + j]), reverse=True)
                    xs += [imgs.pop(i) for i in take]
                    ys += [c] * self.m
                out_x.append(xs)
                out_y.append(np.asarray(ys, dtype=np.int64))
            for c in chosen:
                if len(self.pool[c]) < self.m:
                    left = self.pool.pop(c)
                    self.dropped += len(left)
                    if left and self.on_drop is not None:
                        self.on_drop(left)
            self.batches += 1
            made += 1
        return out_x, out_y
