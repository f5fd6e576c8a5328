"""The loop each Ray Train worker runs: one N-pair batch per step, DDP, report, checkpoint.

Every rank reports metrics through ``ray.train.report``; only rank 0 attaches checkpoints
and logs per-step metrics to MLflow.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

CKPT_FILE = "model.pt"


def make_optimizer(cfg, params):
    """SGD with momentum 0.9 or Adam, per ``train.optimizer``."""
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer, step: int, run_id: str) -> str:
    """Write ``model.pt`` (model/optimizer state, step, MLflow run id) into ``directory``."""
    path = os.path.join(directory, CKPT_FILE)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "run_id": run_id}, path)
    return path


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain types only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. ``loop_config`` holds ``cfg`` (the config as a dict), ``tracking_uri`` and ``run_id``."""
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
    model = ray.train.torch.prepare_model(build_model(cfg.model))
    device = ray.train.torch.get_device()
    cross_rank = cfg.loss.cross_rank if cfg.loss.cross_rank is not None else world > 1
    loss_fn = build_loss(cfg.loss.name, l2_reg=cfg.loss.l2_reg, margin=cfg.loss.margin, cross_rank=cross_rank)
    optimizer = make_optimizer(cfg, model.parameters())
    metrics_out = MetricBuffer(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None

    shard = ray.train.get_dataset_shard("train")
    step, t_last, t_wait, losses = 0, time.perf_counter(), 0.0, []
    t_fetch = time.perf_counter()
    for batch in shard.iter_torch_batches(batch_size=1, prefetch_batches=2):
        t_wait += time.perf_counter() - t_fetch
        images = batch["images"][0].to(device, non_blocking=True)
        labels = batch["labels"][0].to(device)
        model.train()
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(loss.item())
        if metrics_out is not None:
            metrics_out.add(step, {"train/loss": losses[-1]})
        last = step >= cfg.train.steps
        if step % cfg.train.log_every == 0 or last:
            dt = time.perf_counter() - t_last
            n = len(losses)
            m = {
                "step": step,
                "loss": sum(losses) / n,
                "images_per_s": n * images.shape[0] * world / dt,
                "data_wait_frac": t_wait / dt,
            }
            if metrics_out is not None:
                metrics_out.add(step, {"train/images_per_s": m["images_per_s"], "train/data_wait_frac": m["data_wait_frac"]})
                metrics_out.flush()
                print(f"[train] step {step}/{cfg.train.steps} loss {m['loss']:.4f} "
                      f"{m['images_per_s']:.0f} img/s data-wait {100 * m['data_wait_frac']:.0f}%", flush=True)
            want_ckpt = last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if want_ckpt and rank == 0:
                    save_checkpoint(tmp, _unwrap(model), optimizer, step, loop_config["run_id"])
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(m, checkpoint=ckpt)
            t_last, t_wait, losses = time.perf_counter(), 0.0, []
        if last:
            break
        t_fetch = time.perf_counter()
    if step < cfg.train.steps:
        raise RuntimeError(
            f"the data stream ran dry after {step} of {cfg.train.steps} steps on rank {rank}: "
            f"raise data.epochs or lower train.steps"
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model

