"""Rank 0's telemetry, apart from the step: MLflow metrics, throughput, data wait, mining metrics.

Every rank keeps the timers (its ``ray.train.report`` carries its own throughput and
data-wait fraction); only rank 0 logs to MLflow (through ``pipeline.tracking.MetricBuffer``,
which never blocks a step) and prints a progress line per log interval.

Mining metrics (``mine/*``; none when mining is off), logged by rank 0: per step, the
planner's selection info (time, fallbacks, index version) and the asynchronous refreshes
(``pipeline.mining.refresh.AsyncRefresh``) that rank 0 starts every ``miner.refresh_every``
steps without waiting for them; on the steps whose rows carry the random side batch (every
10th), the hardness (``pipeline.mining.hardness``) of the *gathered global batch*, mined
(``mine/<k>``: the embeddings the step already computed) and random (``mine/random_<k>``:
each rank embeds its share of the side batch under no_grad), side by side. The mined group
of a step spans every rank's slice and is trained in one cross-rank loss: measured on one
rank's slice, it would look less hard than it is. The gather is one all_gather of
(B, 2d + 2) per sampled step, which every rank makes.
"""

from __future__ import annotations

import time

import torch


def side_embeddings(module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Embed ``images`` under no_grad in the module's current (train) mode without touching it.

    BatchNorm in train mode normalises with the batch's statistics, as for the trained
    batch, but would also update its running statistics: the forward runs on copies of the
    buffers (``torch.func.functional_call``), so the model is left exactly as it was. Call it
    on the unwrapped module: a DDP forward is a collective (buffer broadcast) and only rank 0
    makes this one. Returns the (B, d) embeddings.
    """
    from torch.func import functional_call

    state = dict(module.named_parameters())
    state.update({k: v.clone() for k, v in module.named_buffers()})
    with torch.no_grad():
        return functional_call(module, state, (images,))


def selection_metrics(batch: dict) -> dict:
    """Rank 0's per-step ``mine/*`` figures of the planner's selection (time, fallbacks, index version)."""
    if "miner_version" not in batch:
        return {}
    return {"mine/select_ms": float(batch["select_ms"][0]), "mine/fallbacks": float(batch["fallbacks"][0]),
            "mine/index_version": float(batch["miner_version"][0])}


def global_hardness(batch: dict, emb: torch.Tensor, labels: torch.Tensor, module: torch.nn.Module,
                    size: int = 0) -> dict:
    """``mine/<k>`` and ``mine/random_<k>``: hardness of the gathered trained batch and of the
    gathered random side batch (see the module docstring); {} on ranks other than 0.

    Every rank calls it at the steps whose row carries the side batch (``has_rand``: the same
    steps on every rank); it runs a collective when ``torch.distributed`` is initialised with
    more than one rank. ``size``: the image side, to decode a side batch that came as JPEG
    bytes (``data.decode_device: cuda``).
    """
    import torch.distributed as dist

    from pipeline.losses.distributed import all_gather_rows, is_cross_rank_active
    from pipeline.mining.hardness import batch_hardness

    if "rand_jpeg" in batch:
        from pipeline.data.decode import decode_batch

        rand_images, _ = decode_batch(batch["rand_jpeg"][0], batch["rand_jpeg_offsets"][0], None, size, emb.device)
    else:
        rand_images = batch["rand_images"][0].to(emb.device)
    rand_emb = side_embeddings(module, rand_images)
    rows = torch.cat([emb.detach().float(), rand_emb.float()], 1)
    ids = torch.stack([labels.to(emb.device), batch["rand_labels"][0].to(emb.device)], 1)
    if is_cross_rank_active(True):
        rows, ids = all_gather_rows(rows), all_gather_rows(ids)
        if dist.get_rank() != 0:
            return {}
    d = emb.shape[1]
    out = {}
    # NaN (a batch of one class has no negative) is left out rather than logged.
    for prefix, z, y in (("mine/", rows[:, :d], ids[:, 0]), ("mine/random_", rows[:, d:], ids[:, 1])):
        out.update({f"{prefix}{k}": v for k, v in batch_hardness(z, y).items() if v == v})
    return out


class Telemetry:
    """Timers on every rank; MLflow, prints and mining metrics on rank 0 (see the module docstring).

    ``refresher``: the mining refresher actor's name (rank 0 requests refreshes), or None.
    """

    def __init__(self, cfg, rank: int, world: int, tracking_uri: str, run_id: str, planner: str,
                 refresher: str | None = None) -> None:
        from pipeline.tracking import MetricBuffer

        self.cfg, self.rank, self.world, self.planner = cfg, rank, world, planner
        self.out = MetricBuffer(tracking_uri, run_id) if rank == 0 else None
        self.refresher = None
        if rank == 0 and refresher:
            from pipeline.mining.refresh import AsyncRefresh

            self.refresher = AsyncRefresh(refresher)
        self.t_last = self.t_fetch = time.perf_counter()
        self.t_wait, self.n_steps = 0.0, 0

    def log(self, step: int, row: dict) -> None:
        """Queue ``row`` for MLflow at ``step`` (rank 0; a no-op elsewhere)."""
        if self.out is not None and row:
            self.out.add(step, row)

    def fetching(self) -> None:
        """The loop starts waiting for its next batch."""
        self.t_fetch = time.perf_counter()

    def arrived(self) -> None:
        """The batch the loop waited for is here."""
        self.t_wait += time.perf_counter() - self.t_fetch

    def after_step(self, step: int, batch: dict, emb: torch.Tensor, labels: torch.Tensor,
                   module: torch.nn.Module) -> None:
        """Per-step metrics of rank 0: mining (when on), refresh requests, the data report at log steps."""
        self.n_steps += 1
        cfg = self.cfg
        t0 = time.perf_counter()
        row = {}
        if cfg.miner.enabled and bool(batch.get("has_rand", [False])[0]):
            row = global_hardness(batch, emb, labels, module, cfg.data.image_size)  # a collective: every rank
        if self.out is None:
            return
        if cfg.miner.enabled:
            row.update(selection_metrics(batch))
        if self.refresher is not None:
            done = self.refresher.poll()
            if done is not None:
                row.update({"mine/refresh_s": done["refresh_s"], "mine/refresh_version": done["version"],
                            "mine/refresh_lag_steps": step - done["step"]})
            if step % cfg.miner.refresh_every == 0:
                # state_dict() tensors are views of the live weights; ray.put copies them now.
                self.refresher.request({k: v.detach().cpu() for k, v in module.state_dict().items()}, step)
                row["mine/refresh_skipped"] = self.refresher.skipped
                row["mine/refresh_failed"] = self.refresher.failed
        if cfg.miner.enabled:
            row["mine/rank0_overhead_ms"] = 1000.0 * (time.perf_counter() - t0)
        if step % cfg.train.log_every == 0 or step >= cfg.train.steps:
            row.update(self._data_metrics())  # the run's skipped-sample counts per reason so far
        self.log(step, row)

    def interval(self, step: int, terms: dict, lr: float, batch_images: int, extra: dict | None = None,
                 checkpoint: bool = False, exclude_s: float = 0.0) -> dict:
        """Close a log interval: returns this rank's report metrics; rank 0 logs and prints them.

        ``terms``: the interval's mean losses (``TrainStep.read``); ``extra``: more metrics for
        MLflow at this step (an evaluation). With ``checkpoint``, rank 0 waits a bounded time for
        MLflow: the steps a checkpoint covers will not be redone, so their metrics should be in
        MLflow before a failure can lose them (no wait during an outage). ``exclude_s``: time
        of the interval that was not training (an evaluation), left out of the throughput.
        """
        dt = max(1e-9, time.perf_counter() - self.t_last - exclude_s)
        m = {"step": step, "loss": terms.get("train/loss", float("nan")),
             "images_per_s": self.n_steps * batch_images * self.world / dt, "data_wait_frac": self.t_wait / dt}
        if self.out is not None:
            self.out.add(step, {**terms, "train/lr": lr, "train/images_per_s": m["images_per_s"],
                                "train/data_wait_frac": m["data_wait_frac"], **(extra or {})})
            self.out.flush()
            print(f"[train] step {step}/{self.cfg.train.steps} loss {m['loss']:.4f} {m['images_per_s']:.0f} img/s "
                  f"data-wait {100 * m['data_wait_frac']:.0f}%", flush=True)
            if checkpoint and not self.out.failing:
                self.out.flush(wait_s=30.0)
        self.t_last, self.t_wait, self.n_steps = time.perf_counter(), 0.0, 0
        return m

    def close(self) -> None:
        if self.out is not None:
            self.out.close(timeout_s=self.cfg.tracking.retry_s)

    def _data_metrics(self) -> dict:
        """The run's ``data/*`` metrics so far, from the planner's bad-input report."""
        import ray

        from pipeline.data.report import report_metrics

        return report_metrics(ray.get(ray.get_actor(self.planner).fetch.remote(), timeout=30))
