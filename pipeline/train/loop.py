"""The loop each Ray Train worker runs: one slice of the planned global batch per step, DDP, report, checkpoint.

Rank r reads its own stream, ``train_<r>`` (``pipeline.data.stream``): its row of step s is
slice r of the planner's plan s, so the ranks' batches of one step are exactly the planned
global batch, and a cross-rank loss (the gather in ``pipeline.losses``) sees all N classes.
Every rank reports metrics through ``ray.train.report``; only rank 0 attaches checkpoints
and logs per-step metrics to MLflow.

Mining metrics (rank 0, per step, ``mine/*``; none when mining is off): the hardness of rank 0's slice
(``pipeline.mining.hardness``, from the embeddings already computed, under no_grad); with
the miner on, also the planner's selection info (time, fallbacks, index version), the same
hardness of the random side slice when the row carries one, and the asynchronous refreshes
(``pipeline.mining.refresh.AsyncRefresh``) that rank 0 starts every ``miner.refresh_every``
steps without waiting for them.

Resuming (``pipeline.train.checkpoint`` has the format): every worker-group start asks
``ray.train.get_checkpoint()`` for the latest complete checkpoint (after a worker failure,
or when a job is rerun with the same ``train.run_name``) and continues from it: weights,
optimizer, RNG states, step counter, the same MLflow run, and the planner's state as of
that step. Before any rank reads its stream, rank 0 hands that state to the planner actor
(``PlannerActor.begin``), which drops what it had planned ahead; the other ranks wait at a
barrier. Rows of steps before the resumed step arrive as ``skip`` rows and cost no read.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from pipeline.train.checkpoint import CKPT_FILE, load_checkpoint, load_checkpoint_dir, save_checkpoint, set_rng_state
from pipeline.train.step import MetricObjective, MixedDiffObjective, TrainStep, make_optimizer, make_scheduler

__all__ = ["CKPT_FILE", "load_checkpoint", "train_loop_per_worker"]


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


def _mining_metrics(batch: dict, emb: torch.Tensor, labels: torch.Tensor, module: torch.nn.Module,
                    step: int) -> dict:
    """Rank 0's per-step ``mine/*`` metrics of one batch (see the module docstring)."""
    from pipeline.mining.hardness import batch_hardness

    # NaN (a rank batch of one class has no negative) is left out rather than logged.
    out = {f"mine/{k}": v for k, v in batch_hardness(emb.detach(), labels).items() if v == v}
    if "miner_version" in batch:
        out["mine/select_ms"] = float(batch["select_ms"][0])
        out["mine/fallbacks"] = float(batch["fallbacks"][0])
        out["mine/index_version"] = float(batch["miner_version"][0])
        if bool(batch["has_rand"][0]):
            rand_emb = side_embeddings(module, batch["rand_images"][0].to(emb.device))
            rand = batch_hardness(rand_emb, batch["rand_labels"][0].to(emb.device))
            out.update({f"mine/random_{k}": v for k, v in rand.items() if v == v})
    return out


def _resume_state(fallback: str | None) -> dict | None:
    """The latest complete checkpoint Ray Train holds for this run, else the one at ``fallback`` (None: fresh start).

    ``fallback`` is a checkpoint the driver found when Ray Train's run snapshot was lost
    (``pipeline.train.checkpoint.latest_checkpoint``); once this job reports a checkpoint, Ray's
    own takes over.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and fallback:
        ckpt = ray.train.Checkpoint(fallback)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_checkpoint_dir(d)


def _begin_attempt(rank: int, world: int, planner: str, step: int, state: dict | None) -> tuple[str, float]:
    """Start this worker group's attempt at ``step``; returns the attempt's ``(token, start time)``.

    Rank 0 tells the planner actor where the attempt starts and hands it the checkpoint's
    planner state (plans the previous attempt made ahead are dropped); then it draws a
    token naming the attempt, and the broadcast of the token is the barrier the other
    ranks wait at before they read their streams.
    """
    import uuid

    import ray

    if rank == 0:
        planner_state = None if state is None else {k: (v.numpy() if torch.is_tensor(v) else v)
                                                    for k, v in state.items()}
        ray.get(ray.get_actor(planner).begin.remote(step, planner_state), timeout=120)
    token = [uuid.uuid4().hex[:12], time.time()] if rank == 0 else [None, None]
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0], token[1]


def _planner_state(planner: str, step: int) -> dict:
    """The planner's state as of ``step``, as tensors and ints (``torch.load(weights_only=True)`` reads them back)."""
    import ray

    state = ray.get(ray.get_actor(planner).state_dict.remote(step), timeout=120)
    # Copies: arrays that come out of the object store may be views of one buffer, which torch.save refuses.
    return {k: (torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v) for k, v in state.items()}


def _data_metrics(planner: str) -> dict:
    """The run's ``data/*`` metrics so far, from the planner's bad-input report."""
    import ray

    from pipeline.data.report import report_metrics

    return report_metrics(ray.get(ray.get_actor(planner).fetch.remote(), timeout=30))


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point.

    ``loop_config`` holds ``cfg`` (the config as a dict), ``tracking_uri``, ``run_id``,
    ``miner`` (None, or ``{"refresher": actor name}`` when rank 0 drives the refresher actor), ``class_models``,
    ``planner`` (the name of the batch planner actor) and ``resume_from`` (a checkpoint
    path to start from when Ray Train has none, or None).
    """
    import ray.train
    import ray.train.torch

    from pipeline.config import Config, config_from_dict
    from pipeline.losses import build_loss
    from pipeline.models import build_model
    from pipeline.tracking import MetricBuffer

    cfg: Config = config_from_dict(loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)  # same init on every rank; DDP broadcasts rank 0's anyway
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    resume = _resume_state(loop_config.get("resume_from"))
    model = build_model(cfg.model)
    if resume is not None:
        # Before prepare_model: DDP broadcasts rank 0's weights when it wraps the model.
        model.load_state_dict(resume["model"])
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the *_object collectives below use the current device with nccl
    cross_rank = cfg.loss.cross_rank if cfg.loss.cross_rank is not None else world > 1
    loss_fn = build_loss(cfg.loss.name, l2_reg=cfg.loss.l2_reg, margin=cfg.loss.margin, cross_rank=cross_rank)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    step, planner_state = 0, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scheduler"):
            scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        step, planner_state = resume["step"], resume.get("planner")
        if resume["run_id"] != loop_config["run_id"]:
            raise RuntimeError(f"the checkpoint of step {step} belongs to MLflow run {resume['run_id']}, "
                               f"this job logs to {loop_config['run_id']}: use a new train.run_name")
        if rank == 0:
            print(f"[train] resuming from the checkpoint of step {step}", flush=True)
    start_step = step
    planner = loop_config["planner"]
    attempt, started = _begin_attempt(rank, world, planner, step, planner_state)
    planner_handle = ray.get_actor(planner)
    done_every = max(1, cfg.data.max_lead // 4)
    if step >= cfg.train.steps:
        return  # the run is complete; nothing to redo
    metrics_out = MetricBuffer(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if metrics_out is not None and resume is not None:
        metrics_out.add(step, {"train/resumed_from_step": step})
    ledger = None
    if cfg.train.sample_ledger:
        from pipeline.train.ledger import SampleLedger

        ledger = SampleLedger(cfg.train.sample_ledger, rank, attempt, started, start_step)
    refresher = None
    if rank == 0 and loop_config.get("miner"):
        from pipeline.mining.refresh import AsyncRefresh

        refresher = AsyncRefresh(loop_config["miner"]["refresher"])
    from pipeline.mining.trainer_side import TrainerMining

    mining = TrainerMining(cfg, loop_config["run_id"], rank, world)  # EMA pushes / trainer-side exemplar refreshes

    objective = MetricObjective(loss_fn)
    if loop_config.get("class_models"):
        cm = loop_config["class_models"]
        model_of_class = torch.full((max(int(k) for k in cm) + 1,), -1, dtype=torch.long, device=device)
        for k, v in cm.items():
            model_of_class[int(k)] = int(v)
        objective = MixedDiffObjective(loss_fn, model_of_class, cfg.loss.model_branch_weight)
    forward = torch.compile(model) if cfg.train.compile else model
    train_step = TrainStep(forward, objective, optimizer, scheduler, cfg.train.precision, cfg.train.grad_clip, device)

    # Rank r reads only its own stream: row i of train_r is slice r of plan (job start + i).
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    t_last, t_wait, n_steps = time.perf_counter(), 0.0, 0
    t_fetch = time.perf_counter()
    for batch in shard.iter_torch_batches(batch_size=1, prefetch_batches=2):
        if bool(batch["end"][0]):
            break  # the planner ran out of passes (data.epochs): reported below
        if bool(batch["skip"][0]):
            continue  # a step before this attempt's start (the streams start where the job started)
        if int(batch["step"][0]) != step:
            raise RuntimeError(f"rank {rank} got the slice of step {int(batch['step'][0])} while at step {step}: "
                               f"the stream lost its order")
        t_wait += time.perf_counter() - t_fetch
        images = batch["images"][0].to(device, non_blocking=True)
        labels = batch["labels"][0].to(device)
        model.train()
        lr = train_step.lr()
        emb = train_step(images, labels)
        step += 1
        # Tell the planner this rank trained the steps so far: it plans at most data.max_lead
        # steps past the slowest *trainer*, so mined selections use recent class embeddings
        # (the streams themselves would run far ahead). Fire and forget, every
        # max_lead / 4 steps: the lead shrinks by that much at most, and the planner
        # handles a quarter of the calls (~2 ms of its CPU each).
        if step % done_every == 0 or step == cfg.train.steps:
            planner_handle.done.remote(step - 1, rank)
        mining.after_step(step, emb, labels, _unwrap(model), batch, metrics_out)
        n_steps += 1
        if ledger is not None:
            ids = batch["sample_ids"][0].cpu().numpy().astype(np.int64)
            keep = ids >= 0  # -1: a slot the stream filled with a copy of another image, not a sample
            ledger.write(step, ids[keep], batch["labels"][0].cpu().numpy()[keep], int(batch["pass"][0]))
        if metrics_out is not None:
            t_mine = time.perf_counter()
            # No mine/* metrics for a run without mining; losses are logged per log interval below.
            row = _mining_metrics(batch, emb.float(), labels, _unwrap(model), step) if cfg.miner.enabled else {}
            if refresher is not None:
                done = refresher.poll()
                if done is not None:
                    row.update({"mine/refresh_s": done["refresh_s"], "mine/refresh_version": done["version"],
                                "mine/refresh_lag_steps": step - done["step"]})
                if step % cfg.miner.refresh_every == 0:
                    # state_dict() tensors are views of the live weights; ray.put copies them now.
                    refresher.request({k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}, step)
                    row["mine/refresh_skipped"] = refresher.skipped
                    row["mine/refresh_failed"] = refresher.failed
            if cfg.miner.enabled:
                row["mine/rank0_overhead_ms"] = 1000.0 * (time.perf_counter() - t_mine)
            if step % cfg.train.log_every == 0 or step >= cfg.train.steps:
                row.update(_data_metrics(planner))  # the run's skipped-sample counts per reason so far
            if row:
                metrics_out.add(step, row)
        last = step >= cfg.train.steps
        want_ckpt = last or bool(cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
        if step % cfg.train.log_every == 0 or want_ckpt:
            dt = time.perf_counter() - t_last
            terms = train_step.read()  # the interval's mean losses: the one host sync of the interval
            m = {
                "step": step,
                "loss": terms["train/loss"],
                "images_per_s": n_steps * images.shape[0] * world / dt,
                "data_wait_frac": t_wait / dt,
            }
            if metrics_out is not None:
                metrics_out.add(step, {**terms, "train/lr": lr, "train/images_per_s": m["images_per_s"],
                                       "train/data_wait_frac": m["data_wait_frac"]})
                metrics_out.flush()
                print(f"[train] step {step}/{cfg.train.steps} loss {m['loss']:.4f} "
                      f"{m['images_per_s']:.0f} img/s data-wait {100 * m['data_wait_frac']:.0f}%", flush=True)
            if want_ckpt and metrics_out is not None and not metrics_out.failing:
                # The steps this checkpoint covers will not be redone: get their metrics
                # into MLflow before a failure can lose them (bounded; no wait during an outage).
                metrics_out.flush(wait_s=30.0)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if want_ckpt and rank == 0:
                    # Written completely (model.pt, then meta.json) before Ray sees the directory.
                    # The planner's state as of this step: where every rank's stream goes on.
                    save_checkpoint(tmp, _unwrap(model), optimizer, step, loop_config["run_id"],
                                    planner_state=_planner_state(planner, step), world_size=world,
                                    scheduler=scheduler)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(m, checkpoint=ckpt)
            t_last, t_wait, n_steps = time.perf_counter(), 0.0, 0
        if last:
            break
        t_fetch = time.perf_counter()
    if ledger is not None:
        ledger.close()
    if metrics_out is not None:
        metrics_out.close(timeout_s=cfg.tracking.retry_s)
    if step < cfg.train.steps:
        raise RuntimeError(
            f"the data stream ran dry after {step} of {cfg.train.steps} steps on rank {rank}: "
            f"raise data.epochs or lower train.steps"
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model

