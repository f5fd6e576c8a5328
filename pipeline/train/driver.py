"""The driver side of a training job: Ray, MLflow run, TorchTrainer.fit, final evaluation.

Resuming a run: Ray Train (V2) keeps a snapshot of the reported checkpoints in
``<train.storage_path>/<run name>/`` and, when a trainer starts with the same
``RunConfig(name, storage_path)``, hands the latest one to the workers through
``ray.train.get_checkpoint()``; that covers both a worker-group restart inside one job
(``train.max_failures``) and a job rerun after the whole job was killed. Before ``fit()``
the driver reads the same snapshot (``ray.train.Result.from_path``) to find the MLflow run
id the checkpoint belongs to, and reopens that run instead of creating a new one.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

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


class StorageError(RuntimeError):
    """``train.storage_path`` cannot hold the run's checkpoints on this cluster."""


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _storage_path(cfg: Config) -> str:
    """``train.storage_path`` (default ``./runs``) with a local path made absolute."""
    path = cfg.train.storage_path or "runs"
    if _is_uri(path):
        return path
    return os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)


def check_storage(storage_path: str, timeout_s: float = 60.0) -> None:
    """On a multi-node cluster, make sure every alive node sees the local ``storage_path``.

    Ray Train's workers and controller write checkpoints from whichever node they run on,
    and a restarted worker group reads them back from another: a directory that is not
    shared would lose checkpoints silently. The driver writes a marker file with a random
    token, and a zero-CPU task pinned to each alive node
    (``NodeAffinitySchedulingStrategy(soft=False)``) reads it back. URIs (``s3://``,
    ``gs://``, ...) and single-node clusters are not checked.

    Raises StorageError for a relative path (on more than one node), or naming the nodes
    that do not see the marker. Nodes that do not answer within ``timeout_s`` get a warning.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if _is_uri(storage_path) or len(nodes) < 2:
        return
    path = storage_path[len("file://"):] if storage_path.startswith("file://") else storage_path
    if not os.path.isabs(path):
        raise StorageError(f"train.storage_path '{storage_path}' is a relative path on a {len(nodes)}-node cluster: "
                           f"give an absolute path on a file system all nodes share (NFS), or an s3:// / gs:// URI")
    token = uuid.uuid4().hex
    marker = os.path.join(path, f".dml-shared-check-{token}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(marker, "w") as f:
            f.write(token)
    except OSError as e:
        raise StorageError(f"train.storage_path '{path}': the driver cannot write there ({e})") from None
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")":
                read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
                for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        missing, silent = [], []
        for node, ref in refs.items():
            if ref not in ready:
                silent.append(node)
            elif ray.get(ref) != token:
                missing.append(node)
    finally:
        try:
            os.remove(marker)
        except OSError:
            pass
    if silent:
        print(f"[train] warning: node(s) {', '.join(silent)} did not answer the storage check within "
              f"{timeout_s:.0f}s; train.storage_path '{path}' must be shared with them too", file=sys.stderr, flush=True)
    if missing:
        raise StorageError(
            f"train.storage_path '{path}' is not shared by all nodes: {', '.join(missing)} cannot see the file "
            f"the driver wrote there ({os.path.basename(marker)}). Checkpoints written on one node would be missing "
            f"on another. Use a shared file system mounted at the same path on every node, or an s3:// / gs:// URI")


def _read_marker(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's (V2) list of registered checkpoints in ``<storage_path>/<run name>/``."""


def latest_checkpoint(storage_path: str, name: str, repair: bool = False) -> dict | None:
    """The checkpoint a job of run ``name`` resumes from: its ``meta.json``, plus ``path`` and ``registered``.

    Normally the latest checkpoint in Ray Train's run snapshot (``registered`` True; Ray
    hands it to the workers itself). Ray writes that snapshot in place, so a job killed at
    the wrong moment leaves it empty or cut (seen here after SIGTERM: a 0-byte file), and
    Ray Train would then refuse to start. Then, or when there is no snapshot at all, the
    newest checkpoint directory whose ``meta.json`` is readable and whose ``model.pt`` has
    the size it records is used (``registered`` False: the driver passes it to the loop).
    With ``repair`` an unreadable snapshot is moved aside (``<name>.unreadable-<time>``) so
    that Ray Train can start; only a driver about to run ``name`` may do that (a running
    job's controller rereads the snapshot when it restarts its worker group). Returns None
    when the run has no complete checkpoint.
    """
    import pyarrow.fs

    fs, exp = pyarrow.fs.FileSystem.from_uri(storage_path.rstrip("/") + "/" + name)
    scheme = storage_path.split("://", 1)[0] + "://" if _is_uri(storage_path) else ""
    snapshot = f"{exp}/{SNAPSHOT_FILE}"
    if fs.get_file_info(snapshot).type == pyarrow.fs.FileType.File:
        try:
            ckpt = _registered_checkpoint(scheme + exp)
        except Exception as e:  # noqa: BLE001 -- whatever Ray makes of a cut snapshot
            if not repair:
                return _newest_complete(fs, exp, scheme)
            aside = f"{snapshot}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            fs.move(snapshot, aside)
            print(f"[train] Ray Train's run snapshot {scheme}{snapshot} is unreadable ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); moved it to {aside} and resuming from "
                  f"the newest complete checkpoint directory", file=sys.stderr, flush=True)
        else:
            if ckpt is None:
                return None
            meta = _read_meta(ckpt.filesystem, ckpt.path)
            if meta is None:
                raise StorageError(f"the latest checkpoint of run '{name}' ({ckpt.path}) has no readable meta.json: "
                                   f"it was written by an older version of this project; use a new train.run_name")
            return dict(meta, path=scheme + ckpt.path, registered=True)
    return _newest_complete(fs, exp, scheme)


def _newest_complete(fs, exp: str, scheme: str) -> dict | None:
    import pyarrow.fs

    best = None
    if fs.get_file_info(exp).type != pyarrow.fs.FileType.Directory:
        return None
    for info in fs.get_file_info(pyarrow.fs.FileSelector(exp)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        meta = _read_meta(fs, info.path)
        if meta is None or fs.get_file_info(f"{info.path}/{meta.get('file', 'model.pt')}").size != meta.get("bytes"):
            continue  # not fully written
        if best is None or meta["step"] > best["step"]:
            best = dict(meta, path=scheme + info.path, registered=False)
    return best


def _registered_checkpoint(exp: str):
    import logging

    import ray.train

    # Reading the snapshot logs Ray's "A run snapshot was found..." advice, meant for fit().
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(exp).checkpoint
    finally:
        quiet.setLevel(level)


def _read_meta(fs, directory: str) -> dict | None:
    import json

    import pyarrow

    from pipeline.train.checkpoint import META_FILE

    try:
        with fs.open_input_stream(f"{directory.rstrip('/')}/{META_FILE}") as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError, pyarrow.ArrowException):
        return None


def open_run(cfg: Config, storage_path: str, name: str) -> tuple[str, str, dict | None]:
    """The MLflow run of this job: the one a previous job of run ``name`` left, else a new one.

    The run id comes from the latest checkpoint (``latest_checkpoint``), else from an
    unfinished MLflow run with that name (killed before its first checkpoint). Returns
    ``(tracking_uri, run_id, the checkpoint to resume from or None)``. Raises StorageError
    when that checkpoint already reached ``train.steps``.
    """
    from pipeline import tracking

    latest = latest_checkpoint(storage_path, name, repair=True) if cfg.train.run_name else None
    uri = tracking.resolve_uri(cfg.tracking.uri)
    if latest is not None:
        run_id, step = latest["run_id"], int(latest["step"])
        if step >= cfg.train.steps:
            raise StorageError(f"run '{name}' (MLflow run {run_id}) already reached step {step} of train.steps="
                               f"{cfg.train.steps} in {storage_path}: raise train.steps to train on, or pick a new "
                               f"train.run_name")
        print(f"[train] resuming run {run_id} ({name}) from step {step}", flush=True)
    else:
        run_id = tracking.find_run(uri, cfg.tracking.experiment, cfg.train.run_name) if cfg.train.run_name else None
        step = 0
        if run_id is not None:
            print(f"[train] resuming run {run_id} ({name}) from step 0: it has no checkpoint yet", flush=True)
    if run_id is None:
        return (*tracking.start_run(cfg, dump_yaml(cfg)), None)
    tracking.resume_run(uri, run_id, dump_yaml(cfg), step)
    return uri, run_id, latest


def _raise_data_quality(report_name: str, max_bad_fraction: float, exc: BaseException) -> None:
    """After a failed fit: when the stream's report shows more bad samples than
    ``data.max_bad_fraction`` allows, raise that ``DataQualityError`` (naming the reasons and
    files) from ``exc``. The stream stops the run with it, but it reaches the driver buried,
    and cut, in Ray Train's worker traceback; the report actor holds the same facts."""
    from pipeline.data.report import REASONS, check_bad_fraction, fetch_report

    try:
        rep = fetch_report(report_name)
    except Exception:  # noqa: BLE001 -- no report: let the original error speak
        return
    counts = [rep["counts"].get(r, 0) for r in REASONS]
    items = [(i["shard"], i["key"], i["reason"]) for i in rep["items"]]
    try:
        check_bad_fraction(counts, rep["samples_seen"], max_bad_fraction, items)
    except Exception as dq:
        raise dq from exc


def start_report(run_id: str):
    """Create the bad-input report actor of a run (``data-report-<run_id>``); returns ``(handle, name)``."""
    from pipeline.data.report import create_report

    name = f"data-report-{run_id}"
    return create_report(name), name


def log_data_report(uri: str, run_id: str, report_name: str, step: int, retry_s: float) -> dict | None:
    """Log the stream's bad-input report to the run: ``data_report.json`` (every skipped file,
    key and reason, the counts) and the run-level ``data/*`` metrics at ``step``. Called when
    the fit ends, also when it failed (a ``data.max_bad_fraction`` stop names its files there
    too). Prints the counts when anything was skipped. Returns the report, or None when the
    actor could not be read (that is printed, not raised: the run's status matters more)."""
    import tempfile

    from pipeline import tracking
    from pipeline.data.report import fetch_report, report_metrics, write_report

    try:
        rep = fetch_report(report_name)
        with tempfile.TemporaryDirectory() as d:
            write_report(rep, os.path.join(d, "data_report.json"))
            tracking.log_artifacts(uri, run_id, d, None, retry_s=retry_s)
        tracking.log_metrics(uri, run_id, report_metrics(rep), step=step, retry_s=retry_s)
    except Exception as e:  # noqa: BLE001 -- a report is a by-product; never mask the run's own outcome
        print(f"[train] could not log the data report: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None
    if rep["bad_total"]:
        counts = ", ".join(f"{r} {n}" for r, n in rep["counts"].items() if n)
        print(f"[train] skipped {rep['bad_total']} bad samples of {rep['samples_seen']} ({counts}); "
              f"details in the run's data_report.json", flush=True)
    return rep


def start_position(run_id: str):
    """Create the data position actor of a run (``position-<run_id>``); returns ``(handle, name)``."""
    from pipeline.data.position import get_or_create_position

    name = f"position-{run_id}"
    return get_or_create_position(name), name


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
    A job whose ``train.run_name`` has checkpoints in ``train.storage_path`` resumes that
    run (see the module docstring). Raises StorageError, before any MLflow run is opened,
    for a storage path the cluster's nodes do not share.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import tracking
    from pipeline.data.stream import build_train_dataset
    from pipeline.train.loop import CKPT_FILE, load_checkpoint, train_loop_per_worker

    init_ray(cfg)
    storage = _storage_path(cfg)
    check_storage(cfg.train.storage_path or storage)
    uri, run_id, latest = open_run(cfg, storage, cfg.train.run_name)
    # A checkpoint Ray Train does not know of (its snapshot was lost): the loop loads it itself.
    resume_from = latest["path"] if latest is not None and not latest["registered"] else None
    name = cfg.train.run_name or f"dml-{run_id[:8]}"
    print(f"[train] MLflow run {run_id} in {uri}; checkpoints in {storage}/{name}", flush=True)
    status = "FAILED"
    report = report_name = None
    try:
        t0 = time.time()
        # The miner, refresher, position and report actors live as long as these handles: keep them until fit ends.
        miner_actors, loop_miner, ds_miner, gate = [], None, None, None
        if cfg.miner.enabled:
            miner_actors, loop_miner, ds_miner, gate = start_miner(cfg, uri, run_id)
        position, position_name = start_position(run_id)
        report, report_name = start_report(run_id)
        ds = build_train_dataset(cfg, _manifest_images(cfg.data.train), miner=ds_miner, gate=gate,
                                 position=position_name, report=report_name)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": to_dict(cfg), "tracking_uri": uri, "run_id": run_id, "miner": loop_miner,
                               "class_models": class_models(cfg), "position": position_name,
                               "resume_from": resume_from},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            ),
            datasets={"train": ds},
        )
        try:
            result = trainer.fit()
        except Exception as e:
            _raise_data_quality(report_name, cfg.data.max_bad_fraction, e)
            raise
        train_s = time.time() - t0
        for actor in miner_actors + [position]:
            ray.kill(actor)  # an unfinished refresh dies with them; nothing waits on it
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        metrics = {"train_loss": float(result.metrics["loss"]), "train_time_s": train_s}
        retry_s = cfg.tracking.retry_s
        with result.checkpoint.as_directory() as d:
            tracking.log_artifacts(uri, run_id, d, "checkpoint", retry_s=retry_s)
            state = load_checkpoint(os.path.join(d, CKPT_FILE))["model"]
        tracking.log_metrics(uri, run_id, {"train_time_s": train_s}, step=cfg.train.steps, retry_s=retry_s)
        if cfg.data.eval:
            from pipeline.eval.evaluate import evaluate_state, initial_state

            ev = evaluate_state(cfg, state, cfg.data.eval)
            untrained = evaluate_state(cfg, initial_state(cfg), cfg.data.eval)
            ev.update({f"untrained_{k}": v for k, v in untrained.items()})
            tracking.log_metrics(uri, run_id, ev, step=cfg.train.steps, retry_s=retry_s)
            metrics.update(ev)
        status = "FINISHED"
        return {"run_id": run_id, "metrics": metrics, "checkpoint": result.checkpoint.path}
    except (KeyboardInterrupt, SystemExit):  # Ray's driver turns SIGTERM into SystemExit
        status = "KILLED"
        raise
    finally:
        if report is not None:
            log_data_report(uri, run_id, report_name, cfg.train.steps, cfg.tracking.retry_s)
            ray.kill(report)
        tracking.end_run(uri, run_id, status, retry_s=cfg.tracking.retry_s)
        if status != "FINISHED":
            print(f"[train] run {run_id} ended {status}", file=sys.stderr, flush=True)
