"""Refreshing the miner's class embeddings from the latest weights, off the training path.

Every ``miner.refresh_every`` steps rank 0 hands its current state dict (``ray.put``) to a
``Refresher`` actor and goes on training: ``AsyncRefresh.request`` never waits. The
refresher embeds the class-exemplar shards (``OUT/exemplars``, a few images per train
class) with Ray Data batch inference, averages each class's exemplar embeddings into one
class embedding, and calls the miner actor's ``update`` (new FAISS index, atomic swap,
version + 1). While one refresh runs, a new request is skipped and counted, so refreshes
never pile up behind a slow one.

Why a long-lived actor running task-based Ray Data UDFs, not ``embed_shards``'s model
actors: measured here (2 cores, 200 exemplars of 64x64, tiny CNN), ``embed_shards`` took
4.3 s per call, nearly all of it starting a fresh model actor (new process, torch import),
while a map task that builds the ``Embedder`` per batch ran in 0.2 s in reused worker
processes (0.23 CPU-s per refresh, all processes counted). The refresher actor keeps Ray
Data itself warm (its first run costs 4-5 s of imports, paid by the driver's initial
refresh before training starts). For exemplar sets of many batches, or on GPUs, pass
``actors`` > 0 to use a pool of model actors instead.

This module knows the miner only by its actor name and its ``update`` method.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import ray

from pipeline.data.manifest import ShardError, list_shards


def resolve_exemplars(train: str, exemplars: str = "") -> str:
    """Where the class-exemplar shards are: ``exemplars`` when given, else the ``exemplars/``
    sibling of the directory of ``train`` (``OUT/train`` -> ``OUT/exemplars``).

    Returns:
        The shard spec (checked to hold at least one ``.tar``).

    Raises:
        ShardError: no exemplar shards there; says how to make them.
    """
    if not exemplars:
        if "://" in train:
            exemplars = train.rstrip("/").rsplit("/", 1)[0] + "/exemplars"
        else:
            base = Path(train.split("*")[0].rstrip("/"))
            if base.is_file():
                base = base.parent
            exemplars = str(base.parent / "exemplars")
    try:
        list_shards(exemplars)
    except ShardError:
        raise ShardError(
            f"miner.enabled needs class-exemplar shards, found none at '{exemplars}': rerun "
            f"`python -m jobs.make_shards` (it writes OUT/exemplars, --exemplars-per-class 2 by default) "
            f"or set data.exemplars"
        ) from None
    return exemplars


def class_means(emb: np.ndarray, labels: np.ndarray, keys: np.ndarray | None = None,
                per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One embedding per class: the mean of its exemplars' embeddings.

    Args:
        emb: (n, d) exemplar embeddings.
        labels: (n,) their class ids.
        keys: (n,) sample keys; with ``per_class`` > 0 only the ``per_class`` exemplars of
            each class with the smallest keys are used (the order rows arrive in is not fixed).
        per_class: cap on exemplars per class; 0 = all.

    Returns:
        ``(class_ids (C,) int64 sorted, means (C, d) float32)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if per_class > 0 and keys is not None:
        order = np.lexsort((np.asarray(keys).astype(str), labels))
        labels, emb = labels[order], emb[order]
        first = np.r_[0, np.flatnonzero(np.diff(labels)) + 1]
        rank = np.arange(len(labels)) - np.repeat(first, np.diff(np.r_[first, len(labels)]))
        keep = rank < per_class
        labels, emb = labels[keep], emb[keep]
    ids, inv = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(ids), emb.shape[1]), dtype=np.float64)
    np.add.at(sums, inv, emb.astype(np.float64))
    return ids, (sums / np.bincount(inv)[:, None]).astype(np.float32)


def _embed_batch(batch: dict, **embedder_kwargs) -> dict:
    # A task-based UDF: build the model per batch in a reused worker process (cheap for a
    # small exemplar set) instead of starting an actor per refresh (seconds).
    from pipeline.eval.embed import Embedder

    return Embedder(**embedder_kwargs)(batch)


def embed_exemplars(spec: str, model_cfg: dict, state_ref, image_size: int, batch_size: int = 256,
                    actors: int = 0, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Embed the exemplar shards at ``spec`` with the weights in the object store at ``state_ref``.

    Ray Data batch inference with ``pipeline.eval.embed.Embedder`` (eval mode, inference).
    ``actors`` = 0 runs it as map tasks, > 0 as that many model actors.

    Returns:
        ``(embeddings (n, d) float32, labels (n,) int64, keys (n,) or None)``.

    Raises:
        ShardError: no shards at ``spec``; ValueError: no decodable image.
    """
    import ray.data

    from pipeline.eval.embed import Embedder

    paths, fs = list_shards(spec)
    kwargs = {"model_cfg": model_cfg, "state_ref": [state_ref], "image_size": image_size, "use_gpu": use_gpu}
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, suffixes=["jpg", "cls"])
    if actors > 0:
        ds = ds.map_batches(Embedder, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                            num_gpus=1 if use_gpu else 0)
    else:
        ds = ds.map_batches(_embed_batch, fn_kwargs=kwargs, batch_size=batch_size, num_cpus=1,
                            num_gpus=1 if use_gpu else 0)
    embs, labels, keys = [], [], []
    for b in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        embs.append(b["embedding"])
        labels.append(b["label"])
        if "key" in b:
            keys.append(b["key"])
    if not embs:
        raise ValueError(f"no decodable images in the exemplar shards at '{spec}'")
    return (np.concatenate(embs), np.concatenate(labels),
            np.concatenate(keys).astype(str) if keys else None)


@ray.remote(num_cpus=0, concurrency_groups={"refresh": 1})
class Refresher:
    """Embeds the exemplar shards with pushed weights and publishes the class embeddings to the miner.

    Create it with ``get_or_create_refresher``. ``num_cpus=0``: it mostly waits on Ray
    Data, whose map tasks reserve their own CPUs.
    """

    def __init__(self, miner_name: str, exemplars: str, model_cfg: dict, image_size: int,
                 per_class: int = 0, namespace: str | None = None, batch_size: int = 256,
                 actors: int = 0, use_gpu: bool = False) -> None:
        from pipeline.runtime import quiet_ray_data

        quiet_ray_data()  # Ray Data's progress tables would flood the job's log at every refresh
        self.miner_name, self.namespace = miner_name, namespace
        self.exemplars, self.model_cfg, self.image_size = exemplars, model_cfg, image_size
        self.per_class, self.batch_size, self.actors, self.use_gpu = per_class, batch_size, actors, use_gpu


    @ray.method(concurrency_group="refresh")
    def refresh(self, state_refs: list, step: int = 0) -> dict:
        """Embed, average per class, ``update`` the miner.

        Args:
            state_refs: ``[ObjectRef of a model state dict]`` (in a list so Ray passes the
                reference, not a copy, on to the map tasks).
            step: the training step the weights are from (echoed back).

        Returns:
            ``{"version": new miner version, "refresh_s": wall seconds, "embed_s": ...,
            "classes": C, "step": step}``.

        Raises:
            RayActorError: the miner actor is dead (a restarting one is waited for).
        """
        t0 = time.perf_counter()
        emb, labels, keys = embed_exemplars(self.exemplars, self.model_cfg, state_refs[0], self.image_size,
                                            self.batch_size, self.actors, self.use_gpu)
        t_embed = time.perf_counter() - t0
        ids, means = class_means(emb, labels, keys, self.per_class)
        miner = ray.get_actor(self.miner_name, namespace=self.namespace)
        version = ray.get(miner.update.remote(ids, means, int(step)))
        return {"version": int(version), "refresh_s": time.perf_counter() - t0, "embed_s": t_embed,
                "classes": int(len(ids)), "step": int(step)}


def get_or_create_refresher(name: str, miner_name: str, exemplars: str, model_cfg: dict, image_size: int,
                            per_class: int = 0, namespace: str | None = None, max_restarts: int = 3,
                            **kwargs):
    """The named ``Refresher`` actor, created if missing; keep the handle referenced (see
    ``get_or_create_miner``: a non-detached actor dies with its creator's last handle).

    Returns:
        The actor handle.
    """
    return Refresher.options(name=name, namespace=namespace, get_if_exists=True,
                             max_restarts=max_restarts).remote(
        miner_name, exemplars, model_cfg, image_size, per_class, namespace, **kwargs)


class AsyncRefresh:
    """Rank 0's side of refreshing: push weights, never wait, at most one refresh in flight.

    ``request`` starts a refresh unless one is still running (then it is skipped and
    counted in ``skipped``); ``poll`` returns a finished refresh's result once.
    Picklable is not needed: it lives in the training loop of rank 0.
    """

    def __init__(self, refresher_name: str, namespace: str | None = None) -> None:
        self.name, self.namespace = refresher_name, namespace
        self.launched = 0
        """Refreshes started."""
        self.skipped = 0
        """Requests dropped because the previous refresh was still running."""
        self.failed = 0
        """Refreshes that raised (dead miner or refresher, unreadable exemplars)."""
        self.last_error: str | None = None
        self._handle = None
        self._inflight = None

    def busy(self) -> bool:
        """True while a started refresh has not finished (its result not yet polled)."""
        if self._inflight is None:
            return False
        ready, _ = ray.wait([self._inflight], timeout=0)
        return not ready

    def request(self, state_dict: dict, step: int) -> bool:
        """Start a refresh from ``state_dict`` (copied into the object store) unless one is running.

        Returns:
            True when a refresh was started, False when skipped (busy) or the refresher
            could not be found (counted in ``failed``).
        """
        if self.busy():
            self.skipped += 1
            return False
        self._collect()  # a finished, unpolled result is dropped in favour of the new one
        try:
            if self._handle is None:
                self._handle = ray.get_actor(self.name, namespace=self.namespace)
            self._inflight = self._handle.refresh.remote([ray.put(state_dict)], step)
        except (ray.exceptions.RayError, ValueError) as exc:
            self.failed += 1
            self.last_error = repr(exc)
            self._handle = None
            return False
        self.launched += 1
        return True

    def poll(self) -> dict | None:
        """The result of the last refresh if it finished since the last poll, else None (never waits)."""
        if self._inflight is None or self.busy():
            return None
        return self._collect()

    def _collect(self) -> dict | None:
        ref, self._inflight = self._inflight, None
        if ref is None:
            return None
        try:
            return ray.get(ref, timeout=0)
        except ray.exceptions.RayError as exc:
            self.failed += 1
            self.last_error = repr(exc)
            self._handle = None
            return None


@dataclasses.dataclass
class MinerSession:
    """A run's hard negative class miner, as :func:`start_miner` left it."""

    actors: list
    """Handles of the miner and refresher actors: keep them referenced while training runs."""
    refresher: str | None
    """Name of the refresher actor rank 0 pushes weights to (None: the trainers feed the miner, ``pipeline.mining.trainer_side``)."""
    miner: str
    """Name of the miner actor (the stream's ``MinerClient`` asks it for classes)."""
    timeout_s: float
    """Seconds the stream waits for the miner before it draws random classes."""
    candidates: str = "random"
    """``miner.candidates``."""
    images_per_class: int = 2
    """M (``batch.images_per_class``): a class is active while it has M unused samples."""
    warmup_steps: int = 0
    """``miner.warmup_steps``: steps planned with uniform classes before the miner selects."""
    select_at: str = "miner"
    """``miner.select_at``: where the greedy step runs (``auto``, ``planner``, ``miner``)."""
    dim: int = 0
    """The embedding size (``model.embedding_dim``): the planner's table copy's width."""
    table_every: int = 5
    """Selections between two table calls of a planner that selects on a copy."""

    def selector(self, pool_classes: int):
        """A picklable factory of the planner's selector (``pipeline.mining.selector.MinedSelector``), called with the class labels."""
        import functools

        from pipeline.mining.selector import MinedSelector

        return functools.partial(MinedSelector, miner=self.miner, pool_classes=pool_classes, timeout_s=self.timeout_s,
                                 candidates=self.candidates, images_per_class=self.images_per_class,
                                 warmup_steps=self.warmup_steps, select_at=self.select_at, dim=self.dim,
                                 table_every=self.table_every)


def start_miner(cfg, uri: str, run_id: str) -> MinerSession:
    """Start the hard negative class miner of a run and fill it with the initial weights.

    Creates the miner actor (``miner-<run_id>``, reserving ``miner.num_gpus``) and, with
    ``miner.source: exemplars``, the refresher actor (``miner-refresher-<run_id>``), then
    runs one refresh synchronously with the initial weights (the same every worker starts
    from; the GPUs are still free, training has not started), so the first batches are
    already mined; its wall time is logged as ``mine/refresh_s`` at step 0. Later
    refreshes come from rank 0 through the refresher (``miner.refresh_by: refresher``) or
    from the training workers (``trainers``, ``pipeline.mining.trainer_side``). With
    ``source: ema`` the miner starts empty (random selections, counted as
    ``mine/unembedded``) and fills as the trainers push class means.

    The planner plans at most ``data.max_lead`` steps (128 by default) ahead of the slowest
    rank's training, so a selection uses embeddings about that many steps old: unchecked,
    Ray Data would select the classes of the whole run within seconds, all with the initial
    embeddings.

    Raises ShardError when ``source: exemplars`` finds no class-exemplar shards (``data.exemplars``).
    """
    from pipeline import tracking
    from pipeline.mining.actor import get_or_create_miner, miner_name
    from pipeline.models import initial_state

    name = miner_name(run_id)
    miner = get_or_create_miner(name, dim=cfg.model.embedding_dim, index=cfg.miner.index,
                                num_gpus=cfg.miner.num_gpus)
    # A planner that selects on a copy asks for the table about twice per change of it.
    changes_every = cfg.miner.push_every if cfg.miner.source == "ema" else cfg.miner.refresh_every
    session = MinerSession([miner], None, name, cfg.miner.timeout_s, cfg.miner.candidates, cfg.batch.images_per_class,
                           cfg.miner.warmup_steps, cfg.miner.select_at, cfg.model.embedding_dim,
                           max(1, changes_every // 2))
    if cfg.miner.source == "ema":
        print(f"[train] miner {name}: EMA of the trained class means, pushed every {cfg.miner.push_every} steps",
              flush=True)
        return session
    exemplars = resolve_exemplars(cfg.data.train, cfg.data.exemplars)
    refresher_name = f"miner-refresher-{run_id}"
    refresher = get_or_create_refresher(
        refresher_name, name, exemplars, dataclasses.asdict(cfg.model), cfg.data.image_size,
        per_class=cfg.miner.exemplars_per_class, use_gpu=cfg.scaling.use_gpu,
    )
    session.actors.append(refresher)
    if cfg.miner.resolved_refresh_by(cfg.scaling.use_gpu) == "refresher":
        session.refresher = refresher_name
    first = ray.get(refresher.refresh.remote([ray.put(initial_state(cfg))], 0))
    print(f"[train] miner {name}: {first['classes']} classes from {exemplars}, "
          f"version {first['version']} in {first['refresh_s']:.1f}s; later refreshes by the "
          f"{'refresher actor' if session.refresher else 'training workers'}", flush=True)
    tracking.log_metrics(uri, run_id, {"mine/refresh_s": first["refresh_s"],
                                       "mine/refresh_version": first["version"]}, step=0)
    return session
