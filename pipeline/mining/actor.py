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
import uuid

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from pipeline.mining.class_index import ClassEmbeddingIndex, ClassSnapshot, faiss_device


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
        self._counts = {"unembedded": 0, "filled": 0, "merges": 0, "selects": 0, "tables": 0}
        self._life = uuid.uuid4().hex
        """Tells this actor's versions from a restarted one's (which counts from 0 again)."""

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

    def table(self, since: tuple[str, int] | None = None, counts: dict | None = None):
        """A copy of the class table for a selector that selects locally (`TableCopyClient`).

        Returns ``(life, version, ids, embeddings)``, or None when ``since`` is this actor's
        ``(life, version)`` still (nothing changed since the caller's copy). ``counts``: the
        caller's ``unembedded``/``filled``/``selects`` since its last call, added to this
        actor's counters so that `stats` covers every selection wherever it was made.
        """
        for key, value in (counts or {}).items():
            if key in ("unembedded", "filled", "selects"):
                self._counts[key] += int(value)
        got = self._index.table(since[1] if since is not None and since[0] == self._life else -1)
        if got is None:
            return None
        self._counts["tables"] += 1
        return (self._life, *got)

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

    def _launch(self, method: str, *args):
        """An ObjectRef of the actor's ``method(*args)``, or None (Ray not initialised here, cooling down, no actor)."""
        if not ray.is_initialized():
            # ray.get_actor would start a local cluster; never do that from here.
            self.last_error = "Ray is not initialised in this process"
            return None
        if time.monotonic() < self._skip_until:
            return None
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self.name, namespace=self.namespace)
            return getattr(self._handle, method).remote(*args)
        except (RayError, ValueError) as exc:
            # ValueError: ray.get_actor found no actor of that name.
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        """Record a failure and start the cooldown."""
        self.last_error = repr(exc)
        if not isinstance(exc, GetTimeoutError):
            # A dead actor may be re-created under the same name; look it up again.
            self._handle = None
        self._skip_until = time.monotonic() + self.cooldown_s

    def _ask(self, method: str, *args):
        """The actor's answer to ``method(*args)`` within ``timeout_s``, or None after a failure (recorded, cooldown started)."""
        ref = self._launch(method, *args)
        if ref is None:
            return None
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except RayError as exc:
            # RayError covers GetTimeoutError and RayActorError (dead, restarting).
            self._failed(exc)
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
        cand = _checked_candidates(candidates, n, type(self).__name__)
        seed = int(rng.integers(2**63 - 1))
        got = self._ask("select", cand, n, seed, None if first is None else int(first), int(filled))
        if got is not None:
            self.last_version = got[0]
            return got[1]
        return self._fallback(cand, n, rng)

    def _fallback(self, cand: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
        """A uniformly random answer from the caller's rng, counted in ``fallbacks``."""
        self.fallbacks += 1
        self.last_version = -1
        return rng.choice(cand, size=n, replace=False).tolist()


def _checked_candidates(candidates, n: int, who: str) -> np.ndarray:
    """``candidates`` as a 1-D int64 array; ValueError unless they are distinct and ``0 <= n <= len``."""
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.ndim != 1 or len(np.unique(cand)) != len(cand):
        raise ValueError(f"{who}.select: candidates must be 1-D distinct class ids")
    if not 0 <= n <= len(cand):
        raise ValueError(f"{who}.select: cannot select n={n} distinct classes from {len(cand)} candidates")
    return cand


LOCAL_TABLE_MAX_BYTES = 64 << 20
"""Largest class table (C x (8 + 4 d) bytes) that ``miner.select_at: auto`` copies into the planner:
32k classes at d = 512 (CASIA-WebFace's 10.5k: 21.6 MB, copied; WebFace42M's 2M: 4.1 GB, not)."""


class TableCopyClient(MinerClient):
    """Sohn's greedy selection on a copy of the miner's class table, kept in the caller (``miner.select_at: planner``).

    Why: asked per step, the miner costs an actor call per selection (3-6 ms of CPU across the
    planner and the miner on a loaded 2-core machine, where the greedy step itself takes 0.25 ms
    for C = 128, N = 32, d = 64). Here the planner selects in its own process; the miner is
    asked for its table once every ``every`` selections, without waiting (`MinerActor.table`,
    which answers None when nothing changed), and a landed answer is installed at the next
    selection. The selection is the miner's own code (`ClassSnapshot.select`, the same rng
    draws as `MinerClient.select`), so on a copy of version v it picks what the miner would
    pick on version v; the copy is at most ``every`` selections plus one call older than the
    miner's table (the planner's lead, up to ``data.max_lead`` steps, is the larger age).
    knn candidates come from an exact FAISS search over the copy (``faiss.knn``, flat).

    Failure model: a miner that stops answering leaves the copy as it is (selections go on,
    on older embeddings; the cooldown of `MinerClient` spaces the retries); only while there
    is no copy at all is a selection random (``fallbacks``). The first selection waits up to
    ``timeout_s`` for the first copy. A restarted miner (a new ``life``, versions from 0
    again) sends its whole table at the next call. The picks without an embedding and the
    knn places filled at random are counted here and sent to the miner with the next call
    (`MinerActor.stats` stays the one place the trainers read them from).

    Size: the copy, C x (8 + 4 d) bytes plus 16 bytes per class of sorted ids: 21.8 MB at
    CASIA-WebFace (10.5k classes, d = 512); WebFace42M's 2M classes (4.1 GB) stay in the
    miner (`LOCAL_TABLE_MAX_BYTES`, ``miner.select_at: auto``).
    """

    def __init__(self, name: str, dim: int, namespace: str | None = None, timeout_s: float = 1.0,
                 cooldown_s: float = 5.0, every: int = 5):
        super().__init__(name, namespace, timeout_s, cooldown_s)
        self.dim, self.every = int(dim), max(1, int(every))
        self._snap = ClassSnapshot(0, np.empty(0, np.int64), np.empty((0, self.dim), np.float32), "flat")
        self._life: str | None = None  # None: no copy yet
        self._pending = None  # ObjectRef of the table call in flight
        self._since_call = 0
        self._counts = {"unembedded": 0, "filled": 0, "selects": 0}  # not yet sent to the miner
        self._sent: dict = {}
        self.copies = 0
        """Tables installed (calls that found the table unchanged do not count)."""

    def __getstate__(self):
        state = super().__getstate__()
        state["_pending"] = None
        return state

    @property
    def version(self) -> int:
        """The copy's version (-1: no copy yet)."""
        return -1 if self._life is None else self._snap.version

    def _since(self):
        return None if self._life is None else (self._life, self._snap.version)

    def _install(self, got) -> None:
        self._since_call, self._sent = 0, {}
        if got is not None:
            life, version, ids, emb = got
            self._life, self._snap = life, ClassSnapshot(int(version), ids, emb, "flat")
            self.copies += 1

    def _unsent(self) -> None:
        for key, value in self._sent.items():  # the counts go with the next call
            self._counts[key] += value
        self._sent = {}

    def _call_failed(self, exc: Exception) -> None:
        self._unsent()
        self._failed(exc)

    def sync(self, wait: bool = False) -> None:
        """Install a table that has come back; send the next call when ``every`` selections have passed
        (at once while there is no copy). ``wait``: wait up to ``timeout_s`` for that call."""
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=self.timeout_s if wait else 0)
            if not ready:
                if wait:
                    self._call_failed(GetTimeoutError(f"no table from the miner {self.name} in {self.timeout_s}s"))
                    self._pending = None
                return
            ref, self._pending = self._pending, None
            try:
                self._install(ray.get(ref))
            except RayError as exc:
                self._call_failed(exc)
                return
        if self._life is not None and self._since_call < self.every:
            return
        self._sent, self._counts = self._counts, dict.fromkeys(self._counts, 0)
        self._pending = self._launch("table", self._since(), self._sent)
        if self._pending is None:  # no Ray, cooling down or no actor (recorded by _launch)
            self._unsent()
        elif wait:
            self.sync(wait=True)

    def neighbours(self, class_id: int, k: int) -> np.ndarray | None:
        """Up to k class ids nearest to `class_id` in the copy (best first), or None without a copy."""
        if self._life is None:
            self.sync(wait=True)
            if self._life is None:
                return None
        return self._snap.neighbours(int(class_id), int(k))

    def select(self, candidates, n: int, rng: np.random.Generator, first: int | None = None,
               filled: int = 0) -> list[int]:
        """As `MinerClient.select`, on the copy (see the class docstring)."""
        cand = _checked_candidates(candidates, n, type(self).__name__)
        seed = int(rng.integers(2**63 - 1))
        self.sync(wait=self._life is None)
        self._since_call += 1
        if self._life is None:
            return self._fallback(cand, n, rng)
        picked = self._snap.select(cand, n, np.random.default_rng(seed), first=None if first is None else int(first))
        self.last_version = self._snap.version
        self._counts["unembedded"] += int(np.count_nonzero(self._snap.rows_of(np.asarray(picked)) < 0))
        self._counts["filled"] += int(filled)
        self._counts["selects"] += 1
        return picked
