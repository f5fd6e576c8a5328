"""The driver side of a training job: the job's story from config to the final metrics.

Check the data -> start or join Ray -> check storage -> open (or reopen) the MLflow run ->
start the run's actors (miner, batch planner) -> one stream per rank -> ``TorchTrainer.fit`` ->
log the checkpoint -> log the MLflow model (``log_model``) -> evaluate -> end the run. Each step's details live with the module
that owns them (``pipeline.runtime``, ``pipeline.data.manifest``, ``pipeline.train.
checkpoint``, ``pipeline.tracking``, ``pipeline.mining.refresh``, ``pipeline.data.report``).

Resuming a run: Ray Train (V2) keeps a snapshot of the reported checkpoints in
``<train.storage_path>/<run name>/`` and, when a trainer starts with the same
``RunConfig(name, storage_path)``, hands the latest one to the workers through
``ray.train.get_checkpoint()``; that covers both a worker-group restart inside one job
(``train.max_failures``) and a job rerun after the whole job was killed. Before ``fit()``
the driver reads the same snapshot (``checkpoint.resume_point``) to find the MLflow run id
the checkpoint belongs to, and reopens that run instead of creating a new one.
"""

from __future__ import annotations

import os
import sys
import time

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline import runtime, tracking
from pipeline.config import Config, dump_yaml
from pipeline.data import report
from pipeline.data.cache import index_spec
from pipeline.data.manifest import absolute_spec, class_models, find_manifest, prepare_data, spec_split
from pipeline.data.planner_actor import create_planner, planner_name
from pipeline.data.stream import build_train_datasets, data_config, stream_shape
from pipeline.eval.evaluate import evaluate_state, log_plots
from pipeline.mining.refresh import start_miner
from pipeline.models import initial_state
from pipeline.models.inference import example_images, inference_model
from pipeline.train.checkpoint import CKPT_FILE, load_checkpoint, resume_point
from pipeline.train.checkpointer import SCORE
from pipeline.train.loop import train_loop_per_worker
from pipeline.train.worker_config import WorkerConfig
from pipeline.train.process_group import LoopbackTorchConfig


def run_training(cfg: Config) -> dict:
    """Train per ``cfg``, evaluate on ``data.eval`` when set, and track it all in MLflow.

    Returns ``{"run_id": ..., "metrics": {...}, "checkpoint": path, "model": {"model_uri", ...}}``. The MLflow run ends
    FINISHED, or FAILED (then the exception propagates), or KILLED on KeyboardInterrupt.
    A job whose ``train.run_name`` has checkpoints in ``train.storage_path`` resumes that
    run (see the module docstring). Raises, before Ray or any MLflow run starts, ShardError
    for shards that mix splits; before any MLflow run is opened, StorageError for a storage
    path the cluster's nodes do not share and CheckpointError for a run already finished.
    """
    prepare_data(cfg)
    runtime.init_ray(cfg.scaling.num_cpus)
    storage = runtime.storage_path(cfg.train.storage_path)
    runtime.check_storage(cfg.train.storage_path or storage)
    latest = resume_point(storage, cfg.train.run_name, cfg.train.steps)
    uri, run_id = tracking.open_run(cfg, dump_yaml(cfg), cfg.train.run_name, latest, inputs=shard_inputs(cfg))
    system = tracking.SystemMetrics(uri, run_id).start()
    # A checkpoint Ray Train does not know of (its snapshot was lost): the loop loads it itself.
    resume_from = latest["path"] if latest is not None and not latest["registered"] else None
    name = cfg.train.run_name or f"dml-{run_id[:8]}"
    print(f"[train] MLflow run {run_id} in {uri}; checkpoints in {storage}/{name}", flush=True)
    # The planner holds the bad-input report: it sees every planned sample and every bad one.
    status, report_name, planner = "FAILED", planner_name(run_id), None
    try:
        t0 = time.time()
        # The run's actors live as long as these handles: keep them until fit ends.
        miner = start_miner(cfg, uri, run_id) if cfg.miner.enabled else None
        _, lead = stream_shape(cfg)
        planner = create_planner(
            report_name, index_spec(cfg.data.train), cfg.batch.classes_per_batch,
            cfg.batch.images_per_class, cfg.scaling.num_workers, cfg.train.seed, sampling=cfg.data.class_sampling,
            max_lead=lead, max_bad_fraction=cfg.data.max_bad_fraction,
            selector=miner.selector(cfg.miner.pool_classes) if miner else None,
            random_every=cfg.miner.hardness_every if miner else 0, max_passes=cfg.data.epochs, cache_dir=cfg.data.cache_dir)
        actors = miner.actors if miner else []
        datasets = build_train_datasets(cfg, report_name, int(latest["step"]) if latest else 0)
        worker = WorkerConfig(worker_config(cfg), uri, run_id, report_name, refresher=miner.refresher if miner else None,
                              class_models=class_models(cfg), resume_from=resume_from)
        evaluates = bool(cfg.eval.data or cfg.data.eval)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=worker.to_dict(),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage,
                # With evaluations, the best-scoring checkpoints are kept (and always the latest).
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=2, checkpoint_score_attribute=SCORE if evaluates else None),
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            ),
            datasets=datasets,
            dataset_config=data_config(),  # rank r reads train_r whole; nothing is split
            torch_config=LoopbackTorchConfig(),  # DDP's rendezvous store on 127.0.0.1 when the workers are
        )
        try:
            result = trainer.fit()
        except Exception as e:
            report.raise_if_too_bad(report_name, cfg.data.max_bad_fraction, e)
            raise
        train_s = time.time() - t0
        for actor in actors:
            ray.kill(actor)  # an unfinished refresh dies with them; nothing waits on it
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        best, best_metrics = best_checkpoint(result)
        metrics = {"train_loss": float(result.metrics["loss"]), "train_time_s": train_s}
        retry_s = cfg.tracking.retry_s
        with best.as_directory() as d:
            # The run's result: the best evaluated checkpoint (the latest without evaluations).
            tracking.log_artifacts(uri, run_id, d, "checkpoint", retry_s=retry_s)
            ckpt_state = load_checkpoint(os.path.join(d, CKPT_FILE))
        state, metrics["best_step"] = ckpt_state["model"], float(ckpt_state["step"])
        if evaluates:
            metrics[f"best_{cfg.eval.metric}"] = float(best_metrics[SCORE])
            print(f"[train] best checkpoint: step {ckpt_state['step']} ({cfg.eval.metric} "
                  f"{best_metrics[SCORE]:.4f} during training)", flush=True)
        logged = log_model(cfg, uri, run_id, state)
        tracking.log_metrics(uri, run_id, metrics, step=cfg.train.steps, retry_s=retry_s)
        if cfg.data.eval:
            ev = evaluate_and_plot(cfg, uri, run_id, state)
            if cfg.eval.untrained:
                untrained = evaluate_state(cfg, initial_state(cfg), cfg.data.eval)
                ev.update({f"untrained_{k}": v for k, v in untrained.items()})
            tracking.log_metrics(uri, run_id, ev, step=cfg.train.steps, retry_s=retry_s)
            metrics.update(ev)
        status = "FINISHED"
        return {"run_id": run_id, "metrics": metrics, "checkpoint": best.path, "model": logged}
    except (KeyboardInterrupt, SystemExit):  # Ray's driver turns SIGTERM into SystemExit
        status = "KILLED"
        raise
    finally:
        system.stop()
        if planner is not None:
            report.log_report(uri, run_id, report_name, cfg.train.steps, cfg.tracking.retry_s)
            ray.kill(planner)
        tracking.end_run(uri, run_id, status, retry_s=cfg.tracking.retry_s)
        if status != "FINISHED":
            print(f"[train] run {run_id} ended {status}", file=sys.stderr, flush=True)


def worker_config(cfg: Config) -> Config:
    """A copy of ``cfg`` for the training workers: local shard paths made absolute (a Ray
    worker's working directory is not the job's)."""
    from pipeline.config import config_from_dict, to_dict

    out = config_from_dict(to_dict(cfg))
    out.data.train, out.data.eval = absolute_spec(cfg.data.train), absolute_spec(cfg.data.eval)
    out.data.exemplars, out.eval.data = absolute_spec(cfg.data.exemplars), absolute_spec(cfg.eval.data)
    return out


def best_checkpoint(result) -> tuple:
    """``(checkpoint, its reported metrics)``: the one with the highest ``eval_score``
    (ties: the later step), or the latest when no checkpoint was scored."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(SCORE, float("-inf")) > float("-inf")]
    if not scored:
        return result.checkpoint, result.metrics
    return max(scored, key=lambda cm: (cm[1][SCORE], cm[1]["step"]))


def log_model(cfg: Config, uri: str, run_id: str, state: dict) -> dict:
    """Log the trained weights as the run's MLflow model (uint8 images -> unit-norm embeddings).

    Registered as ``tracking.register_model`` when set. Returns what
    ``tracking.log_inference_model`` returns.
    """
    model = inference_model(cfg.model, state, cfg.data.image_size)
    return tracking.log_inference_model(uri, run_id, model, example_images(cfg.data.image_size),
                                        registered_name=cfg.tracking.register_model, step=cfg.train.steps,
                                        retry_s=cfg.tracking.retry_s)


def shard_inputs(cfg: Config) -> list:
    """The run's MLflow dataset inputs: ``data.train`` (context train), ``data.eval`` (eval) and
    ``eval.data`` (validation: the set that picks the best checkpoint), digests from the manifest."""
    sets = [("train", cfg.data.train, "train")] + ([("eval", cfg.data.eval, "holdout")] if cfg.data.eval else [])
    sets += [("validation", cfg.eval.data, None)] if cfg.eval.data else []  # None: its split, from the manifest
    inputs = []
    for context, spec, split in sets:
        manifest = find_manifest(spec)  # read once per set (hundreds of MB at WebFace42M)
        inputs.append(tracking.shard_dataset(context, spec, manifest, split or spec_split(spec, manifest) or "val"))
    return inputs


def evaluate_and_plot(cfg: Config, uri: str, run_id: str, state: dict) -> dict:
    """Retrieval evaluation of ``state`` on ``data.eval``; its plots (Recall@K, matches) go to the run's ``eval/retrieval/``."""
    return log_plots(uri, run_id, "retrieval", lambda d: evaluate_state(cfg, state, cfg.data.eval, plot_dir=d),
                     retry_s=cfg.tracking.retry_s)
