"""Where the stream stands: the sample ids a (previous) run already consumed, for resuming.

A resumed run must not train on a sample twice. Whoever resumes (the train loop's owner)
puts the consumed ``sample_ids`` (see ``pipeline/data/reader.py``: they encode pass, shard
and position, so they stay valid across runs with the same ``data.train`` and seed) into a
named :class:`DataPosition` actor and passes its name to ``build_train_dataset(...,
position=name)``; the batch composer fetches them once, on its first call, and drops
those samples (counted as ``resumed_skip``, not as bad).
"""

from __future__ import annotations

import numpy as np


class DataPosition:
    """Holds a sorted, unique int64 array of consumed sample ids (a Ray actor; see :func:`get_or_create_position`)."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, dtype=np.int64)

    def set(self, ids) -> int:
        """Replace the consumed ids; returns how many distinct ids are held.

        Negative ids are left out: -1 marks an image in a row's ``sample_ids`` that did not
        decode and was replaced by a copy of another (never a sample), so a row's ids can be
        passed as they are. Raises ValueError for ids that are not integers."""
        arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"DataPosition.set: sample ids must be integers, got dtype {arr.dtype}")
        arr = np.unique(arr.astype(np.int64).ravel())
        self.ids = arr[arr >= 0]
        return int(self.ids.size)

    def get(self) -> np.ndarray:
        """The consumed ids, sorted and unique."""
        return self.ids


def get_or_create_position(name: str, namespace: str | None = None):
    """The named :class:`DataPosition` actor, created if it does not exist yet; returns its handle.

    Needs a connected Ray. Keep the handle referenced until the stream has started (a
    non-detached actor dies with its creator's last handle).
    """
    import ray

    cls = ray.remote(num_cpus=0)(DataPosition)
    return cls.options(name=name, namespace=namespace, get_if_exists=True).remote()
