"""The training workers' side of mining: fresh class embeddings when the trainers hold every GPU.

The train loop makes one :class:`TrainerMining` per worker and calls
:meth:`TrainerMining.after_step` once per trained step, on every rank. What it does
depends on the config (nothing when ``miner.enabled`` is off):

* ``miner.source: ema``: the rank adds the per-class sums of the embeddings it just
  trained (detached, on the device: no host sync per step) and every ``miner.push_every``
  steps pushes the per-class means to the miner actor (``MinerActor.merge`` with
  ``miner.ema_momentum``), fire and forget. No extra forward pass; the miner's work is
  proportional to the classes pushed.
* ``miner.source: exemplars`` with ``miner.refresh_by`` resolved to ``trainers`` (``auto``
  with ``scaling.use_gpu``): every ``miner.refresh_every`` steps each rank embeds its
  share of the class exemplars (classes ``rank::W`` of the sorted exemplar classes) with
  the live weights, in eval mode under no_grad, and pushes their means
  (``MinerActor.merge``, momentum 0). This needs no GPU besides the trainer's own, so it
  is never skipped for lack of resources, where the ``Refresher`` actor's Ray Data tasks
  wait forever for a GPU that a trainer holds. It is synchronous: its cost is on the
  training path (``mine/refresh_s``), 1/W of the exemplars per rank and refresh, or with
  ``miner.refresh_classes`` > 0 only that many classes' (a rolling window), so a refresh
  costs what it refreshes, not every class every time.
* With the ``refresher`` actor (``refresh_by: refresher``) rank 0's ``AsyncRefresh`` in the
  loop does the work and this class only logs the age metrics.

Rank 0 also logs ``mine/refresh_age_steps`` (the trained step minus the mean training step
of the embeddings in the index version its batch was selected with; version steps come
from ``MinerActor.stats``, polled without waiting), ``mine/unembedded`` (picks made at
random for want of an embedding) and ``mine/knn_filled`` (knn candidates drawn at random),
both cumulative counts of the miner actor since its (re)start.

Memory per rank: ema, the pending sums (push_every x N/W classes x d: ~0.4 MB at N=192,
d=512, W=8); trainer exemplars, the JPEG bytes of the rank's share of the exemplars,
held from the first refresh on (CASIA-WebFace: 21k exemplars x ~3.5 kB / W, ~9 MB at W=8;
WebFace42M: 4M x 3.5 kB / W, ~1.8 GB at W=8 -- there prefer ``ema``).
"""

from __future__ import annotations

import time

import numpy as np
import torch


def trainer_mode(cfg) -> str | None:
    """What the training workers do for the miner: ``"ema"``, ``"exemplars"`` or None (nothing)."""
    if not cfg.miner.enabled:
        return None
    if cfg.miner.source == "ema":
        return "ema"
    return "exemplars" if cfg.miner.resolved_refresh_by(cfg.scaling.use_gpu) == "trainers" else None


def embed_in_eval_mode(module: torch.nn.Module, images: np.ndarray, device, batch_size: int = 256) -> np.ndarray:
    """(n, d) float32 embeddings of uint8 NHWC ``images`` in eval mode under no_grad; the module's mode is restored
    (``pipeline.eval.heldout.embed_images``, which the evaluations during training use too)."""
    from pipeline.eval.heldout import embed_images

    return embed_images(module, images, device, batch_size)


def load_exemplar_share(spec: str, rank: int, world: int, per_class: int = 0) -> tuple[list[bytes], np.ndarray]:
    """The JPEG bytes and labels of the exemplars of classes ``sorted(classes)[rank::world]``.

    ``per_class`` > 0 keeps the first ``per_class`` exemplars (by key) of each class, as
    ``refresh.class_means`` does. Reads every exemplar shard (local or a pyarrow URI).

    Returns:
        ``(jpgs, labels (n,) int64)``, grouped by class.

    Raises:
        ShardError: no exemplar shards at ``spec``.
    """
    from pipeline.data.manifest import iter_labelled, list_shards

    # The refresh only needs what is readable; bad input is counted on the train path.
    samples = [(label, key, jpg) for key, label, jpg in iter_labelled(*list_shards(spec)) if label is not None]
    classes = np.unique(np.asarray([s[0] for s in samples], dtype=np.int64))
    mine = set(classes[rank::world].tolist())
    samples = sorted((s for s in samples if s[0] in mine), key=lambda s: (s[0], s[1]))
    if per_class > 0:
        kept, seen = [], {}
        for s in samples:
            seen[s[0]] = seen.get(s[0], 0) + 1
            if seen[s[0]] <= per_class:
                kept.append(s)
        samples = kept
    return [s[2] for s in samples], np.asarray([s[0] for s in samples], dtype=np.int64)


class TrainerMining:
    """A training worker's part in mining; see the module docstring. Build it on every rank.

    Args:
        cfg: the run's ``pipeline.config.Config``.
        run_id: the MLflow run id (names the miner actor, ``actor.miner_name``).
        rank, world: this worker's rank and the world size.
        exemplars: exemplar shard spec; empty = ``refresh.resolve_exemplars`` of ``cfg.data``.
    """

    def __init__(self, cfg, run_id: str, rank: int, world: int, exemplars: str = "") -> None:
        self.mode = trainer_mode(cfg)
        self.enabled = bool(cfg.miner.enabled)
        self.rank, self.world = rank, world
        from pipeline.mining.actor import miner_name

        self.miner = miner_name(run_id)
        m = cfg.miner
        self.refresh_every, self.push_every, self.momentum = m.refresh_every, m.push_every, m.ema_momentum
        self.per_class, self.refresh_classes, self._cursor = m.exemplars_per_class, m.refresh_classes, 0
        self.image_size = cfg.data.image_size or 64
        self.exemplars = exemplars
        if self.mode == "exemplars" and not exemplars:
            from pipeline.mining.refresh import resolve_exemplars

            self.exemplars = resolve_exemplars(cfg.data.train, cfg.data.exemplars)
        self._share: tuple[list[bytes], np.ndarray] | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handle = None
        self._last_push = None
        self._stats_ref = None
        self.stats: dict = {}
        """The miner's last ``stats()`` answer (rank 0)."""
        self.pushes = 0
        """Pushes sent to the miner (EMA pushes or exemplar refreshes)."""
        self.push_failed = 0
        """Pushes the miner did not take (dead, restarting, bad input): seen at the next push."""
        self.refreshes = 0
        """Trainer-side exemplar refreshes made; none is ever skipped."""

    # -- the loop's one call -------------------------------------------------------------

    def after_step(self, step: int, emb: torch.Tensor, labels: torch.Tensor, module: torch.nn.Module,
                   batch: dict | None = None, metrics=None) -> dict:
        """After training step ``step`` (1-based count of steps done): feed the miner, log on rank 0.

        ``emb`` / ``labels``: the embeddings and labels this rank just trained; ``module``: the
        unwrapped model; ``batch``: the stream's row (for ``miner_version``); ``metrics``: rank
        0's ``MetricBuffer`` (None elsewhere). Never raises for a missing or dead miner.

        Returns:
            The ``mine/*`` metrics it added for this step (also added to ``metrics``).
        """
        if not self.enabled:
            return {}
        row: dict = {}
        if self.mode == "ema":
            self._add(emb, labels)
            if step % self.push_every == 0:
                t0 = time.perf_counter()
                self._push_ema(step)
                row["mine/push_ms"] = 1000.0 * (time.perf_counter() - t0)
        elif self.mode == "exemplars" and step % self.refresh_every == 0:
            t0 = time.perf_counter()
            self.refresh(step, module, emb.device)
            row["mine/refresh_s"] = time.perf_counter() - t0
            row["mine/refresh_skipped"] = 0.0  # a trainer-side refresh cannot be skipped: it is synchronous
        if self.rank == 0:
            row.update(self._age_metrics(step, batch))
            if metrics is not None and row:
                metrics.add(step, row)
        return row

    # -- EMA of the trained embeddings ---------------------------------------------------

    def _add(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        emb = emb.detach().float()
        uniq, inv = torch.unique(labels, return_inverse=True)
        sums = torch.zeros((len(uniq), emb.shape[1]), dtype=emb.dtype, device=emb.device).index_add_(0, inv, emb)
        counts = torch.bincount(inv, minlength=len(uniq))
        self._pending.append((uniq, sums, counts))

    def pending_means(self) -> tuple[np.ndarray, np.ndarray]:
        """The per-class means of the embeddings added since the last push (and clears them): ``(ids, means)``."""
        if not self._pending:
            return np.empty(0, np.int64), np.empty((0, 0), np.float32)
        ids = torch.cat([p[0] for p in self._pending])
        sums = torch.cat([p[1] for p in self._pending])
        counts = torch.cat([p[2] for p in self._pending])
        self._pending = []
        uniq, inv = torch.unique(ids, return_inverse=True)
        total = torch.zeros((len(uniq), sums.shape[1]), dtype=sums.dtype, device=sums.device).index_add_(0, inv, sums)
        n = torch.zeros(len(uniq), dtype=counts.dtype, device=counts.device).index_add_(0, inv, counts)
        means = total / n[:, None].to(total.dtype)
        return uniq.cpu().numpy().astype(np.int64), means.cpu().numpy().astype(np.float32)

    def _push_ema(self, step: int) -> None:
        ids, means = self.pending_means()
        # A class whose embeddings summed to zero cannot be normalised by the miner: left out.
        keep = np.linalg.norm(means, axis=1) > 0 if len(ids) else np.zeros(0, bool)
        if keep.any():
            self._send(ids[keep], means[keep], step, self.momentum)

    # -- exemplars embedded by the trainers -------------------------------------------

    def refresh(self, step: int, module: torch.nn.Module, device) -> None:
        """Embed this rank's share of the exemplars with the live weights and push the class means."""
        from pipeline.data.decode import decode_images
        from pipeline.mining.refresh import class_means

        if self._share is None:
            self._share = load_exemplar_share(self.exemplars, self.rank, self.world, self.per_class)
        jpgs, labels = self._share
        self.refreshes += 1
        if not jpgs:
            return  # more ranks than exemplar classes: nothing for this one
        if self.refresh_classes:
            jpgs, labels = self._window(jpgs, labels)
        images, ok = decode_images(jpgs, self.image_size)
        emb = embed_in_eval_mode(module, images, device)
        ids, means = class_means(emb, labels[ok])
        keep = np.linalg.norm(means, axis=1) > 0
        self._send(ids[keep], means[keep], step, 0.0)

    def _window(self, jpgs: list[bytes], labels: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        """The exemplars of this refresh's classes: the next ceil(refresh_classes / W) of this rank's, cyclically."""
        classes = np.unique(labels)
        take = min(len(classes), -(-self.refresh_classes // self.world))
        picked = classes[(self._cursor + np.arange(take)) % len(classes)]
        self._cursor = (self._cursor + take) % len(classes)
        keep = np.flatnonzero(np.isin(labels, picked))
        return [jpgs[i] for i in keep], labels[keep]

    # -- talking to the miner ------------------------------------------------------------

    def _actor(self):
        import ray

        if self._handle is None:
            self._handle = ray.get_actor(self.miner)
        return self._handle

    def _send(self, ids: np.ndarray, means: np.ndarray, step: int, momentum: float) -> None:
        """``MinerActor.merge``, fire and forget; the previous push's failure is counted now."""
        import ray

        if self._last_push is not None:
            ready, _ = ray.wait([self._last_push], timeout=0)
            if ready:
                try:
                    ray.get(ready[0])
                except (ray.exceptions.RayError, ValueError):
                    self.push_failed += 1
                    self._handle = None
        try:
            self._last_push = self._actor().merge.remote(ids, means, int(step), float(momentum))
            self.pushes += 1
        except (ray.exceptions.RayError, ValueError):
            # ValueError: no actor of that name (yet, or a dead one not restarted): the next push asks again.
            self.push_failed += 1
            self._handle = None
            self._last_push = None

    def _age_metrics(self, step: int, batch: dict | None) -> dict:
        """Rank 0: poll ``MinerActor.stats`` without waiting; the age of this batch's embeddings."""
        import ray

        if self._stats_ref is not None:
            ready, _ = ray.wait([self._stats_ref], timeout=0)
            if ready:
                try:
                    # The whole answer replaces the last: a restarted actor counts versions from 1 again.
                    self.stats = ray.get(ready[0])
                except ray.exceptions.RayError:
                    self._handle = None
                self._stats_ref = None
        if self._stats_ref is None:
            try:
                self._stats_ref = self._actor().stats.remote()
            except (ray.exceptions.RayError, ValueError):
                self._handle = None
        out = {}
        if self.stats:
            out["mine/unembedded"] = float(self.stats["unembedded"])
            out["mine/knn_filled"] = float(self.stats["filled"])
        version = int(batch["miner_version"][0]) if batch is not None and "miner_version" in batch else -1
        steps = self.stats.get("version_steps", {})
        if version > 0 and version in steps:
            out["mine/refresh_age_steps"] = float(step - steps[version])
        if self.mode is not None:
            out["mine/push_failed"] = float(self.push_failed)
        return out
