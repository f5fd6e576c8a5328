"""The hard negative class miner as the batch planner's selector (Sohn 2016's greedy step).

Per step: a candidate set of ``miner.pool_classes`` classes drawn uniformly from all
*active* classes (Sohn's "large random set of C classes", from every class of the pass, not
from the shards being read), then the miner actor's greedy selection of N mutually hard
classes among them (``pipeline.mining.actor.MinerClient``: random when the miner does not
answer in time, counted as ``fallbacks``). With ``pool_classes`` <= N every candidate is
taken: there is nothing to choose.
"""

from __future__ import annotations

import numpy as np

from pipeline.mining.actor import MinerClient


class MinedSelector:
    """A :class:`pipeline.data.planner.Selector` backed by the miner actor ``miner``."""

    def __init__(self, labels: np.ndarray, miner: str, pool_classes: int, timeout_s: float = 2.0) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.index_of = {int(c): i for i, c in enumerate(self.labels)}
        self.client = MinerClient(miner, timeout_s=timeout_s)
        self.pool_classes = int(pool_classes)

    @property
    def last_version(self) -> int:
        """The miner's index version behind the last selection (-1: a random fallback)."""
        return self.client.last_version

    @property
    def fallbacks(self) -> int:
        """Selections drawn at random because the miner did not answer."""
        return self.client.fallbacks

    def __call__(self, active: np.ndarray, n: int, rng: np.random.Generator, remaining: np.ndarray) -> np.ndarray:
        """``n`` distinct class indices of ``active``: the miner's greedy pick among a random candidate set."""
        c = min(max(self.pool_classes, n), active.size)
        cand = active[rng.choice(active.size, size=c, replace=False)]
        chosen = self.client.select(self.labels[cand], n, rng)
        return np.asarray([self.index_of[int(x)] for x in chosen], dtype=np.int64)
