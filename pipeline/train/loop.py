"""The loop each Ray Train worker runs: one slice of the planned global batch per step, DDP, report, checkpoint.

Rank r reads its own stream, ``train_<r>`` (``pipeline.data.stream``): its row of step s is
slice r of the planner's plan s, so the ranks' batches of one step are exactly the planned
global batch, and a cross-rank loss (the gather in ``pipeline.losses``) sees all N classes.
Every rank reports metrics through ``ray.train.report``; only rank 0 attaches checkpoints
and logs to MLflow.

The parts, each in its own module: the step (``pipeline.train.step.TrainStep``: forward,
objective, backward, clipping, optimizer, schedule; the benchmarks time the same one), the
checkpoint protocol (``pipeline.train.checkpointer``), rank 0's telemetry and mining
metrics (``pipeline.train.telemetry``), the evaluation during training
(``pipeline.eval.heldout``) and the typed worker config (``pipeline.train.worker_config``).

Resuming (``pipeline.train.checkpoint`` has the format): every worker-group start asks
``ray.train.get_checkpoint()`` for the latest complete checkpoint (after a worker failure,
or when a job is rerun with the same ``train.run_name``) and continues from it: weights,
optimizer, RNG states, step counter, the same MLflow run, and the planner's state as of
that step. Before any rank reads its stream, rank 0 hands that state to the planner actor
(``PlannerActor.begin``), which drops what it had planned ahead; the other ranks wait at a
barrier. Rows of steps before the resumed step arrive as ``skip`` rows and cost no read.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.data.stream import done_every as report_every
from pipeline.train.checkpoint import CKPT_FILE, load_checkpoint
from pipeline.train.checkpointer import Checkpointer
from pipeline.train.step import MetricObjective, MixedDiffObjective, TrainStep, make_optimizer, make_scheduler
from pipeline.train.telemetry import Telemetry
from pipeline.train.worker_config import WorkerConfig

__all__ = ["CKPT_FILE", "load_checkpoint", "step_images", "train_loop_per_worker"]


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; ``loop_config`` is a :class:`WorkerConfig` as a dict."""
    import ray
    import ray.train

    wc = WorkerConfig.from_dict(loop_config)
    cfg = wc.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)  # same init on every rank; DDP broadcasts rank 0's anyway
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    resume = Checkpointer.load(wc.resume_from)
    model, module, device = _model(cfg, resume)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    ckpt = Checkpointer(cfg, wc.run_id, wc.planner, rank, world, evaluates=bool(cfg.eval.data or cfg.data.eval))
    step, planner_state = ckpt.restore(resume, optimizer, scheduler) if resume is not None else (0, None)
    start_step = step
    attempt, started = _begin_attempt(rank, world, wc.planner, step, planner_state)
    if step >= cfg.train.steps:
        return  # the run is complete; nothing to redo
    heldout = _heldout(cfg) if rank == 0 else None
    planner = ray.get_actor(wc.planner)
    done_every = report_every(cfg)
    telemetry = Telemetry(cfg, rank, world, wc.tracking_uri, wc.run_id, wc.planner, wc.refresher)
    from pipeline.mining.trainer_side import TrainerMining

    mining = TrainerMining(cfg, wc.run_id, rank, world)  # EMA pushes / trainer-side exemplar refreshes
    if resume is not None:
        telemetry.log(step, {"train/resumed_from_step": step})
    ledger = None
    if cfg.train.sample_ledger:
        from pipeline.train.ledger import SampleLedger

        ledger = SampleLedger(cfg.train.sample_ledger, rank, attempt, started, start_step)
    forward = torch.compile(model) if cfg.train.compile else model
    train_step = TrainStep(forward, _objective(cfg, wc.class_models, world, device), optimizer, scheduler,
                           cfg.train.precision, cfg.train.grad_clip, device)

    # Rank r reads only its own stream: row i of train_r is slice r of plan (job start + i).
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    for batch in shard.iter_torch_batches(batch_size=1, prefetch_batches=2):
        if bool(batch["end"][0]):
            break  # the planner ran out of passes (data.epochs): reported below
        if bool(batch["skip"][0]):
            continue  # a step before this attempt's start (the streams start where the job started)
        if int(batch["step"][0]) != step:
            raise RuntimeError(f"rank {rank} got the slice of step {int(batch['step'][0])} while at step {step}: "
                               f"the stream lost its order")
        telemetry.arrived()
        labels = batch["labels"][0].to(device)
        images = step_images(batch, cfg.data.image_size, device, labels, planner)
        model.train()
        lr = train_step.lr()
        emb = train_step(images, labels)
        step += 1
        # Tell the planner this rank trained the steps so far: it plans at most data.max_lead
        # steps past the slowest *trainer*, so mined selections use recent class embeddings
        # (the streams themselves would run far ahead). Fire and forget, every max_lead / 4
        # steps: the lead shrinks by that much at most, and the planner handles a quarter
        # of the calls (~2 ms of its CPU each).
        if step % done_every == 0 or step == cfg.train.steps:
            planner.done.remote(step - 1, rank)
        mining.after_step(step, emb, labels, module, batch, telemetry.out)
        if ledger is not None:
            ids = batch["sample_ids"][0].cpu().numpy().astype(np.int64)
            keep = ids >= 0  # -1: a slot the stream filled with a copy of another image, not a sample
            ledger.write(step, ids[keep], batch["labels"][0].cpu().numpy()[keep], int(batch["pass"][0]))
        telemetry.after_step(step, batch, emb, labels, module)
        if step % cfg.train.log_every == 0 or ckpt.due(step):
            evaluated, eval_s = _evaluate(cfg, heldout, module, device, step) if ckpt.eval_due(step) else ({}, 0.0)
            m = telemetry.interval(step, train_step.read(), lr, images.shape[0], extra=evaluated,
                                   checkpoint=ckpt.due(step), exclude_s=eval_s)
            ckpt.report(step, m, module, optimizer, scheduler, score=evaluated.get(cfg.eval.metric))
        if step >= cfg.train.steps:
            break
        telemetry.fetching()
    if ledger is not None:
        ledger.close()
    telemetry.close()
    if step < cfg.train.steps:
        raise RuntimeError(
            f"the data stream ran dry after {step} of {cfg.train.steps} steps on rank {rank}: "
            f"raise data.epochs or lower train.steps"
        )


def _model(cfg, resume: dict | None):
    """``(model wrapped by Ray Train (DDP), the module inside, device)``, with the checkpoint's weights when resuming."""
    import ray.train.torch

    from pipeline.models import build_model

    model = build_model(cfg.model)
    if resume is not None:
        model.load_state_dict(resume["model"])  # before DDP wraps it: it broadcasts rank 0's weights
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the *_object collectives below use the current device with nccl
    return model, (model.module if hasattr(model, "module") else model), device


def step_images(batch: dict, size: int, device: torch.device, labels: torch.Tensor, planner) -> torch.Tensor:
    """The step's (B, H, W, 3) uint8 images on ``device``: the stream's pixels, or, with
    ``data.decode_device: cuda``, its JPEG bytes decoded here (``pipeline.data.decode.decode_batch``).

    An image that fails to decode here is replaced by a classmate's and reported to the planner
    (``PlannerActor.report_bad``: counted as ``corrupt_image``, not planned again).
    """
    if "jpeg" not in batch:
        return batch["images"][0].to(device, non_blocking=True)
    from pipeline.data.decode import decode_batch

    images, ok = decode_batch(batch["jpeg"][0], batch["jpeg_offsets"][0], batch["flips"][0], size, device,
                              batch["shifts"][0] if "shifts" in batch else None)
    if not bool(ok.all()):
        ids = batch["sample_ids"][0]
        good = ok.to(labels.device)
        for slot in torch.nonzero(~ok).flatten().tolist():
            mates = torch.nonzero(good & (labels == labels[slot])).flatten()
            if len(mates):
                images[slot] = images[int(mates[0])]
        planner.report_bad.remote([int(i) for i in ids[~ok] if int(i) >= 0], "corrupt_image")
    return images


def _objective(cfg, class_models: dict[int, int] | None, world: int, device: torch.device):
    """The metric loss (``loss.*``), or the Mixed Difference Network's when the classes have vehicle models."""
    from pipeline.losses import build_loss

    cross_rank = cfg.loss.cross_rank if cfg.loss.cross_rank is not None else world > 1
    loss_fn = build_loss(cfg.loss.name, l2_reg=cfg.loss.l2_reg, margin=cfg.loss.margin, cross_rank=cross_rank,
                         negatives=cfg.loss.negatives, seed=cfg.train.seed, scale=cfg.loss.scale)
    if not class_models:
        return MetricObjective(loss_fn)
    model_of_class = torch.full((max(class_models) + 1,), -1, dtype=torch.long, device=device)
    for k, v in class_models.items():
        model_of_class[k] = v
    return MixedDiffObjective(loss_fn, model_of_class, cfg.loss.model_branch_weight)


def _heldout(cfg):
    """Rank 0's held-out set for evaluations during training (``eval.data``, else ``data.eval``), or None."""
    spec = cfg.eval.data or cfg.data.eval
    if not spec:
        return None
    from pipeline.eval.heldout import HeldOutSet

    t0 = time.perf_counter()
    held = HeldOutSet(spec, cfg.data.image_size, cfg.eval.max_images, seed=cfg.train.seed)
    print(f"[train] evaluating every {cfg.eval.every or cfg.train.steps} steps on {len(held)} images of "
          f"{held.num_classes} classes of '{spec}' (loaded in {time.perf_counter() - t0:.1f}s)", flush=True)
    return held


def _evaluate(cfg, heldout, module: torch.nn.Module, device: torch.device, step: int) -> tuple[dict, float]:
    """Rank 0's evaluation at ``step``: ``(metrics, seconds)``; ({}, 0) on the other ranks."""
    if heldout is None:
        return {}, 0.0
    t0 = time.perf_counter()
    out = heldout.evaluate(module, device, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size, seed=cfg.train.seed)
    secs = time.perf_counter() - t0
    print(f"[train] step {step}: {cfg.eval.metric} {out[cfg.eval.metric]:.4f} on {len(heldout)} held-out images "
          f"({secs:.1f}s)", flush=True)
    return {**out, "eval/seconds": secs}, secs


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
