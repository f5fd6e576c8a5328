"""The driver side of a training job: Ray, MLflow run, TorchTrainer.fit, final evaluation."""

from __future__ import annotations

import os
import sys
import time

from pipeline.config import Config, dump_yaml, to_dict


def init_ray(cfg: Config) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local instance bound to loopback.

    On a small machine, declare more logical CPUs than cores: training workers each hold
    ``scaling.cpus_per_worker`` and Ray Data's read/decode tasks need CPUs of their own,
    or the stream never starts and the job hangs silently.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        _quiet_ray_data()
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    _quiet_ray_data()
    cores = os.cpu_count() or 1
    num_cpus = cfg.scaling.num_cpus or max(8, 4 * cores)
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=True, logging_level="WARNING")


def shutdown_ray() -> None:
    """Stop this process's Ray connection (local instance included) if one is open."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _quiet_ray_data() -> None:
    # Ray Data's per-operator progress tables flood a terminal every few seconds; the
    # trainer prints its own progress (steps, images/s, data wait).
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _storage_path(cfg: Config) -> str:
    return cfg.train.storage_path or os.path.abspath("runs")


def _manifest_images(spec: str) -> int | None:
    from pipeline.data.shards import find_manifest

    m = find_manifest(spec)
    return m["splits"]["train"]["images"] if m else None


def start_miner(cfg: Config, uri: str, run_id: str) -> tuple[list, dict, dict, dict]:
    """Start the hard negative class miner for a run and fill it with the initial weights.

    Creates the miner actor (``miner-<run_id>``) and the refresher actor
    (``miner-refresher-<run_id>``), then runs one refresh synchronously with the initial
    weights (the same every worker starts from), so the first batches are already mined;
    its wall time is logged as ``mine/refresh_s`` at step 0.

    The composer is kept about ``miner.refresh_every`` (at least 16) global batches ahead
    of the trainer (``pipeline.data.stream._TrainerGate``): unchecked, Ray Data selects the
    classes of the whole run within seconds, all with the initial embeddings. So a batch's
    classes are chosen with class embeddings about two refresh intervals old, against at
    most one in Sohn's in-loop mining.

    Returns:
        ``(actor handles to keep referenced during fit, the loop's miner settings, the
        stream's MinerClient settings, the stream's gate settings)``.

    Raises:
        ShardError: no class-exemplar shards (``data.exemplars``).
    """
    import dataclasses

    import ray

    from pipeline import tracking
    from pipeline.eval.evaluate import initial_state
    from pipeline.mining.actor import get_or_create_miner
    from pipeline.mining.refresh import get_or_create_refresher, resolve_exemplars

    exemplars = resolve_exemplars(cfg.data.train, cfg.data.exemplars)
    name, refresher_name = f"miner-{run_id}", f"miner-refresher-{run_id}"
    miner = get_or_create_miner(name, dim=cfg.model.embedding_dim, index=cfg.miner.index)
    refresher = get_or_create_refresher(
        refresher_name, name, exemplars, dataclasses.asdict(cfg.model), cfg.data.image_size,
        per_class=cfg.miner.exemplars_per_class, use_gpu=cfg.scaling.use_gpu,
    )
    first = ray.get(refresher.refresh.remote([ray.put(initial_state(cfg))], 0))
    print(f"[train] miner {name}: {first['classes']} classes from {exemplars}, "
          f"version {first['version']} in {first['refresh_s']:.1f}s", flush=True)
    tracking.log_metrics(uri, run_id, {"mine/refresh_s": first["refresh_s"],
                                       "mine/refresh_version": first["version"]}, step=0)
    gate = {"actor": refresher_name, "max_lead": max(16, cfg.miner.refresh_every)}
    return [miner, refresher], {"refresher": refresher_name}, {"name": name, "timeout_s": cfg.miner.timeout_s}, gate


def class_models(cfg: Config) -> dict[int, int] | None:
    """Class id -> vehicle model id (-1 unknown) from the shards' manifest, for the Mixed Difference Network.

    The model is an attribute of the vehicle, so the model branch's labels follow from the
    batch's class labels. Returns None unless ``model.arch`` is ``mixed_diff``; raises
    ShardError when the manifest or its ``model`` labels are missing.
    """
    from pipeline.data.shards import ShardError, find_manifest

    if cfg.model.arch != "mixed_diff":
        return None
    manifest = find_manifest(cfg.data.train)
    if manifest is None or "model" not in manifest.get("extra_fields", []):
        raise ShardError(f"model.arch=mixed_diff needs shards with vehicle model labels and their manifest.json "
                         f"(python -m jobs.make_shards --layout vehicleid); none found for data.train='{cfg.data.train}'")
    out = {}
    for c in manifest["classes"]:
        m = (c.get("extras") or {}).get("model")
        out[int(c["id"])] = -1 if m is None else int(m)
    return out


def run_training(cfg: Config) -> dict:
    """Train per ``cfg``, evaluate on ``data.eval`` when set, and track it all in MLflow.

    Returns ``{"run_id": ..., "metrics": {...}, "checkpoint": path}``. The MLflow run ends
    FINISHED, or FAILED (then the exception propagates), or KILLED on KeyboardInterrupt.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import tracking
    from pipeline.data.stream import build_train_dataset
    from pipeline.train.loop import CKPT_FILE, load_checkpoint, train_loop_per_worker

    init_ray(cfg)
    uri, run_id = tracking.start_run(cfg, dump_yaml(cfg))
    print(f"[train] MLflow run {run_id} in {uri}", flush=True)
    status = "FAILED"
    try:
        t0 = time.time()
        # The miner and refresher actors live as long as these handles: keep them until fit ends.
        miner_actors, loop_miner, ds_miner, gate = [], None, None, None
        if cfg.miner.enabled:
            miner_actors, loop_miner, ds_miner, gate = start_miner(cfg, uri, run_id)
        ds = build_train_dataset(cfg, _manifest_images(cfg.data.train), miner=ds_miner, gate=gate)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": to_dict(cfg), "tracking_uri": uri, "run_id": run_id, "miner": loop_miner,
                               "class_models": class_models(cfg)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=cfg.train.run_name or f"dml-{run_id[:8]}",
                storage_path=_storage_path(cfg),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            ),
            datasets={"train": ds},
        )
        result = trainer.fit()
        train_s = time.time() - t0
        for actor in miner_actors:
            ray.kill(actor)  # an unfinished refresh dies with them; nothing waits on it
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        metrics = {"train_loss": float(result.metrics["loss"]), "train_time_s": train_s}
        with result.checkpoint.as_directory() as d:
            tracking.log_artifacts(uri, run_id, d, "checkpoint")
            state = load_checkpoint(os.path.join(d, CKPT_FILE))["model"]
        tracking.log_metrics(uri, run_id, {"train_time_s": train_s}, step=cfg.train.steps)
        if cfg.data.eval:
            from pipeline.eval.evaluate import evaluate_state, initial_state

            ev = evaluate_state(cfg, state, cfg.data.eval)
            untrained = evaluate_state(cfg, initial_state(cfg), cfg.data.eval)
            ev.update({f"untrained_{k}": v for k, v in untrained.items()})
            tracking.log_metrics(uri, run_id, ev, step=cfg.train.steps)
            metrics.update(ev)
        status = "FINISHED"
        return {"run_id": run_id, "metrics": metrics, "checkpoint": result.checkpoint.path}
    except (KeyboardInterrupt, SystemExit):  # Ray's driver turns SIGTERM into SystemExit
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, run_id, status)
        if status != "FINISHED":
            print(f"[train] run {run_id} ended {status}", file=sys.stderr, flush=True)
