"""The miner as a named Ray actor, and the client the data stream uses to ask it.

`MinerActor` is a thin wrapper around `ClassEmbeddingIndex`. It is threaded
(`max_concurrency` > 1) so a select is served while an update builds the next
index; the index's atomic snapshot swap makes that safe.

Failure model: the actor restarts up to `max_restarts` times, but a restarted
actor runs `__init__` again and holds an EMPTY index (version 0) whose select is
uniformly random, until someone calls `update` again (the refresher re-pushes
embeddings on its next refresh). Its users never wait for it: `MinerClient`
bounds every call by a timeout and falls back to random selection, counted.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from pipeline.mining.class_index import ClassEmbeddingIndex, faiss_device


@ray.remote
class MinerActor:
    """A `ClassEmbeddingIndex` served over Ray; create it with `get_or_create_miner`.

    A flat index goes to a GPU only when this actor reserved one from Ray
    (`get_or_create_miner(num_gpus=...)`, a fraction is enough): `faiss_device`.

    Counters (since the actor's start; `stats`): `unembedded`, picks made at random
    because the class had no embedding yet; `filled`, knn candidates the selectors had
    to draw at random (seed without an embedding, too few active neighbours); `merges`.
    """

    def __init__(self, dim: int, index: str = "flat"):
        self._index = ClassEmbeddingIndex(dim, index, device=faiss_device(ray.get_gpu_ids()))
        self._counts = {"unembedded": 0, "filled": 0, "merges": 0, "selects": 0}

    def update(self, class_ids: np.ndarray, embeddings: np.ndarray, step: int = 0) -> int:
        """Publish a whole new class set; returns the new version (raises ValueError on bad input)."""
        return self._index.update(class_ids, embeddings, step)

    def merge(self, class_ids: np.ndarray, embeddings: np.ndarray, step: int, momentum: float = 0.0) -> int:
        """Change (or add) some classes' rows, EMA with `momentum`; returns the new version.

        Trainers call it fire-and-forget; see `ClassEmbeddingIndex.merge`.
        """
        version = self._index.merge(class_ids, embeddings, step, momentum)
        self._counts["merges"] += 1
        return version

    def select(self, candidates, n: int, seed: int, first: int | None = None,
               filled: int = 0) -> tuple[int, list[int]]:
        """Greedy selection of n classes from `candidates` with `np.random.default_rng(seed)`.

        `first`: start from this candidate (the knn seed class). `filled`: how many of the
        candidates the caller drew at random for lack of neighbours (counted here).

        Returns:
            (version, class_ids): the snapshot version the selection was made
            on (0 means no embeddings, so the selection is random) and the ids.
        """
        snap = self._index.snapshot()
        picked = self._index.select(candidates, n, np.random.default_rng(seed), first=first)
        self._counts["unembedded"] += int(np.count_nonzero(snap.rows_of(np.asarray(picked)) < 0))
        self._counts["filled"] += int(filled)
        self._counts["selects"] += 1
        return snap.version, picked

    def neighbours(self, class_id: int, k: int) -> tuple[int, np.ndarray]:
        """(version, up to k nearest class ids of `class_id`, best first); see `ClassSnapshot.neighbours`."""
        return self._index.version, self._index.neighbours(class_id, k)

    def nearest_classes(self, class_ids, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS k-nearest classes of each class; see `ClassSnapshot.nearest_classes`."""
        return self._index.nearest_classes(class_ids, k)

    def version(self) -> int:
        """The current snapshot version (0 after a (re)start until the first update)."""
        return self._index.version

    def stats(self) -> dict:
        """``{"version", "classes", "device", "version_steps": {version: mean step of its rows}, **counters}``."""
        snap = self._index.snapshot()
        return {"version": snap.version, "classes": len(snap.ids), "device": self._index.device,
                "version_steps": dict(self._index.version_steps), **self._counts}

    def ping(self) -> bool:
        """Returns True; a cheap liveness check."""
        return True


def miner_name(run_id: str) -> str:
    """The miner actor's name for MLflow run ``run_id``."""
    return f"miner-{run_id}"


def get_or_create_miner(
    name: str,
    dim: int,
    index: str = "flat",
    namespace: str | None = None,
    max_restarts: int = 3,
    detached: bool = False,
    num_cpus: float = 0,
    max_concurrency: int = 4,
    num_gpus: float = 0,
):
    """The named miner actor, created if it does not exist yet.

    Needs a connected Ray (`ray.init`). An existing actor of that name is
    returned as is, whatever its `dim` and `index`.

    Keep the returned handle referenced for as long as the miner is needed
    (e.g. in the driver for the whole fit): a non-detached actor, named or not,
    is killed when its creator's last handle is garbage-collected (seen with
    Ray 2.60: `del handle` -> `ray.get_actor(name)` fails); handles obtained
    with `ray.get_actor` do not keep it alive. Detached actors do not have this
    problem but outlive the job.

    Args:
        name: actor name, shared by the driver, refresher and stream.
        dim: embedding dimension.
        index: FAISS index kind, "flat", "ivf" or "hnsw".
        namespace: Ray namespace; None is the job's namespace.
        max_restarts: restarts after a crash (restarted actors start empty).
        detached: outlive the driver that created it (then kill it yourself).
        num_cpus: logical CPUs reserved; 0 by default because the clusters
            this runs on are CPU-starved and the actor mostly idles.
        max_concurrency: threads serving calls, so select runs during update.
        num_gpus: GPU share reserved from Ray (``miner.num_gpus``); > 0 puts a flat
            index on that GPU, 0 keeps FAISS on the CPU whatever GPUs the node has.

    Returns:
        The actor handle.

    Raises:
        ValueError: max_restarts < 1 (the miner must survive a crash).
    """
    if max_restarts < 1:
        raise ValueError(f"get_or_create_miner: max_restarts must be >= 1, got {max_restarts}")
    if num_gpus < 0:
        raise ValueError(f"get_or_create_miner: num_gpus (miner.num_gpus) must be >= 0, got {num_gpus}")
    return MinerActor.options(
        name=name,
        namespace=namespace,
        lifetime="detached" if detached else None,
        get_if_exists=True,
        max_restarts=max_restarts,
        # A call caught by a crash is retried once on the restarted actor.
        max_task_retries=1,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_concurrency=max_concurrency,
    ).remote(dim, index)


class MinerClient:
    """Asks the named miner actor for N classes; never fails and never blocks long.

    Any failure -- Ray not initialised in this process, actor not found, dead,
    restarting past the timeout, or an error inside the call -- makes `select` return a uniformly random choice
    from the same rng and increments `fallbacks`. After a failure the actor is
    not asked again for `cooldown_s`, so a missing miner costs one timeout,
    not one per batch. Picklable: the handle is looked up lazily by name.
    """

    def __init__(
        self,
        name: str,
        namespace: str | None = None,
        timeout_s: float = 1.0,
        cooldown_s: float = 5.0,
    ):
        self.name = name
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.fallbacks = 0
        """Selections answered at random because the actor could not answer."""
        self.last_version = -1
        """Snapshot version of the last actor answer; -1 for none yet or a fallback,
        0 for an actor without embeddings (its answer was random)."""
        self.last_error: str | None = None
        """repr of the last failure, for logs."""
        self._handle = None
        self._skip_until = 0.0

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def _ask(self, method: str, *args):
        """The actor's answer to ``method(*args)``, or None after a failure (recorded, cooldown started)."""
        if not ray.is_initialized():
            # ray.get_actor would start a local cluster; never do that from here.
            self.last_error = "Ray is not initialised in this process"
            return None
        if time.monotonic() < self._skip_until:
            return None
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self.name, namespace=self.namespace)
            return ray.get(getattr(self._handle, method).remote(*args), timeout=self.timeout_s)
        except (RayError, ValueError) as exc:
            # RayError covers GetTimeoutError and RayActorError (dead, restarting);
            # ValueError: ray.get_actor found no actor of that name.
            self.last_error = repr(exc)
            if not isinstance(exc, GetTimeoutError):
                # A dead actor may be re-created under the same name; look it up again.
                self._handle = None
            self._skip_until = time.monotonic() + self.cooldown_s
            return None

    def neighbours(self, class_id: int, k: int) -> np.ndarray | None:
        """Up to k class ids nearest to `class_id` (best first), or None when the miner did not answer."""
        got = self._ask("neighbours", int(class_id), int(k))
        return None if got is None else np.asarray(got[1], dtype=np.int64)

    def select(self, candidates, n: int, rng: np.random.Generator, first: int | None = None,
               filled: int = 0) -> list[int]:
        """n distinct classes from `candidates`: the miner's greedy pick, else random.

        Exactly one `rng.integers` draw seeds the actor call, then a fallback
        draws from the same rng, so the caller's random stream stays reproducible.
        `first` and `filled`: see `MinerActor.select`.

        Returns:
            n distinct class ids from `candidates`.

        Raises:
            ValueError: the candidates are not 1-D or hold duplicates, or n is
                negative or exceeds the number of candidates.
        """
        cand = np.asarray(candidates, dtype=np.int64)
        if cand.ndim != 1 or len(np.unique(cand)) != len(cand):
            raise ValueError("MinerClient.select: candidates must be 1-D distinct class ids")
        if not 0 <= n <= len(cand):
            raise ValueError(
                f"MinerClient.select: cannot select n={n} distinct classes from {len(cand)} candidates"
            )
        seed = int(rng.integers(2**63 - 1))
        got = self._ask("select", cand, n, seed, None if first is None else int(first), int(filled))
        if got is not None:
            self.last_version = got[0]
            return got[1]
        self.fallbacks += 1
        self.last_version = -1
        return rng.choice(cand, size=n, replace=False).tolist()
