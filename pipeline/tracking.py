"""MLflow: the run's params, tags, config, metrics and artifacts.

Only the driver and rank 0 talk to MLflow. With no ``tracking.uri`` the store is a SQLite
file ``mlflow.db`` in the working directory, with artifacts under ``mlartifacts/`` beside
it (absolute paths, so Ray workers whose working directory differs write to the same store).

A tracking server that goes away must not stop training. :class:`MetricBuffer` sends
metrics from a background thread and keeps what did not arrive for the next flush, so a
training step never waits on MLflow; the outage is reported once (and its end once). The
MLflow client's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with
exponential backoff: minutes per call) would hide the outage inside one call and log a
urllib3 warning per retry, so for http(s) URIs this module sets them to 0 retries and a
10 s timeout unless the environment already sets them, and retries on its own terms:
the buffer at its next flush, :func:`call_with_retries` for the driver's one-off calls
(run end, final metrics, artifacts) for up to ``tracking.retry_s`` seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_DB = "mlflow.db"


def metric_name(name: str) -> str:
    """An MLflow-legal metric name: ``recall@1`` -> ``recall_at_1``, ``tar@far=1e-03`` -> ``tar_at_far_1e-03``."""
    name = name.replace("@", "_at_")
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name).replace("__", "_")


def with_mlflow_names(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """``metrics`` plus each one under the name MLflow shows it by (``prefix`` + :func:`metric_name`):
    ``{"recall@1": x}`` -> ``{"recall@1": x, "recall_at_1": x}``. For the jobs' final JSON lines,
    which keep their historical names beside MLflow's."""
    out = dict(metrics)
    out.update({prefix + metric_name(k): v for k, v in metrics.items()})
    return out


def resolve_uri(uri: str) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by the Ray Jobs supervisor for the entrypoint
        # Under `ray job submit` the working directory is a temporary copy: a default
        # ./mlflow.db would vanish with it.
        raise ValueError("running as a Ray job: set tracking.uri (an MLflow server or an absolute sqlite:/// path) "
                         "or MLFLOW_TRACKING_URI; the default ./mlflow.db would be lost with the job's working dir")
    return f"sqlite:///{Path.cwd().resolve() / DEFAULT_DB}"


HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow HTTP client settings used unless the environment sets them (see the module docstring)."""


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        for k, v in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
    return MlflowClient(tracking_uri=uri)


def call_with_retries(fn, what: str, retry_s: float, first_wait_s: float = 1.0):
    """Call ``fn()`` until it succeeds or ``retry_s`` seconds have passed; returns its result.

    Waits double from ``first_wait_s`` (capped at 30 s) between attempts and prints one line
    on the first failure. MLflow's "not found"/"invalid" answers are not retried. Raises the
    last error when time runs out.
    """
    from mlflow.exceptions import MlflowException

    deadline, wait, told = time.monotonic() + retry_s, first_wait_s, False
    while True:
        try:
            return fn()
        except MlflowException as e:
            if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            err = e
        except OSError as e:  # connection errors that escape MLflow's wrapping
            err = e
        if time.monotonic() + wait > deadline:
            raise err
        if not told:
            print(f"[tracking] {what} failed ({_short(err)}); retrying for up to {retry_s:.0f}s",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(wait)
        wait = min(30.0, 2 * wait)


def _short(err: BaseException) -> str:
    text = str(getattr(err, "message", "") or err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def _git_commit(short: bool = True) -> str:
    # A job submitted to Ray runs from an upload without .git; the submitter can pass it.
    if os.environ.get("DML_GIT_COMMIT"):
        return os.environ["DML_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe(cfg) -> str:
    """The run's description (MLflow's ``mlflow.note.content``, shown atop the run page): data, model, loss, batch, mining, workers."""
    m, b = cfg.model, cfg.batch
    arch = "Mixed Difference Network, " if m.arch == "mixed_diff" else ""
    return (f"{m.backbone} ({arch}{m.embedding_dim}-d embedding) trained with {cfg.loss.name} on "
            f"`{cfg.data.train}`{f', evaluated on `{cfg.data.eval}`' if cfg.data.eval else ''}: "
            f"{cfg.train.steps} steps of N={b.classes_per_batch} classes x M={b.images_per_class} images at "
            f"{cfg.data.image_size or 'shard'} px, hard class mining {'on' if cfg.miner.enabled else 'off'}, "
            f"{cfg.scaling.num_workers} {'GPU' if cfg.scaling.use_gpu else 'CPU'} workers.")


def shard_dataset(context: str, spec: str, manifest: dict | None, split: str):
    """The MLflow ``DatasetInput`` of shard set ``spec`` (``context`` train or eval; ``split`` of its manifest).

    Name ``<shard set folder>/<split>``; digest: the first 16 hex digits of a SHA-256 over the
    split's shard checksums in the manifest (so equal data gives an equal digest, whatever its
    path), or over the path when there is no manifest; profile: images, classes, shards, side.
    """
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    shards = sorted((s["path"], s["sha256"]) for s in (manifest or {}).get("shards", []) if s.get("split") == split)
    text = "\n".join(f"{p} {h}" for p, h in shards) if shards else spec
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    root = Path(spec.rstrip("/"))
    scheme = spec.split("://", 1)[0] if "://" in spec else "local"
    source = spec if "://" in spec else str(root.resolve())
    profile = dict((manifest or {}).get("splits", {}).get(split, {}))
    if manifest:
        profile["image_size"] = manifest.get("image_size", 0)
    ds = Dataset(name=f"{root.parent.name or root.name}/{split}", digest=digest, source_type=scheme,
                 source=json.dumps({"uri": source}), schema=json.dumps({"jpg": "JPEG bytes", "cls": "class id"}),
                 profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])


def experiment_id(uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing (artifacts beside a SQLite store)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


START_TOKEN_TAG = "start_token"
"""Tag holding a random token per :func:`start_run` call: a retried ``create_run`` whose first
attempt reached the server (its answer lost to a timeout) finds that run instead of making a second."""


def start_run(cfg, config_yaml: str, dataset: str = "", inputs: list | None = None,
              retry_s: float | None = None) -> tuple[str, str]:
    """Create the MLflow run for a training job: tags, flat params, ``config.yaml`` artifact, dataset inputs.

    Tags include MLflow's own: ``mlflow.source.git.commit`` (full), ``mlflow.source.name``
    (the job), ``mlflow.note.content`` (:func:`describe`). ``inputs``: ``DatasetInput`` s
    (:func:`shard_dataset`). Each call to the server is retried for up to ``retry_s``
    seconds (default ``tracking.retry_s``), so a job started while its tracking server is
    down or slow waits for it instead of failing; a retried run creation never makes a
    second run (:data:`START_TOKEN_TAG`). Returns ``(tracking_uri, run_id)``.
    """
    import uuid

    from pipeline.config import to_flat_dict

    uri = resolve_uri(cfg.tracking.uri)
    retry_s = cfg.tracking.retry_s if retry_s is None else retry_s
    client = _client(uri)
    token = uuid.uuid4().hex
    tags = {
        "dataset": dataset or Path(cfg.data.train.rstrip("/")).parent.name or cfg.data.train,
        "loss": cfg.loss.name,
        "mining": "on" if cfg.miner.enabled else "off",
        "git_commit": _git_commit(),
        "world_size": str(cfg.scaling.num_workers),
        "backbone": cfg.model.backbone,
        "mlflow.source.git.commit": _git_commit(short=False),
        "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "jobs.train",
        "mlflow.source.type": "LOCAL",
        "mlflow.note.content": describe(cfg),
        START_TOKEN_TAG: token,
    }
    exp_id = call_with_retries(lambda: experiment_id(uri, cfg.tracking.experiment),
                               f"opening experiment '{cfg.tracking.experiment}' in {uri}", retry_s)
    tries = 0

    def create():
        nonlocal tries
        tries += 1
        if tries > 1:  # an earlier attempt may have made the run before its answer was lost
            made = client.search_runs([exp_id], filter_string=f"tags.{START_TOKEN_TAG} = '{token}'", max_results=1)
            if made:
                return made[0]
        return client.create_run(exp_id, run_name=cfg.train.run_name or None, tags=tags)

    run_id = call_with_retries(create, f"creating a run in {uri}", retry_s).info.run_id
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in sorted(to_flat_dict(cfg).items())]
    for i in range(0, len(params), 100):
        call_with_retries(lambda: client.log_batch(run_id, params=params[i : i + 100]),
                          f"logging params to run {run_id}", retry_s)
    call_with_retries(lambda: client.log_text(run_id, config_yaml, "config.yaml"),
                      f"uploading config.yaml to run {run_id}", retry_s)
    if inputs:
        call_with_retries(lambda: client.log_inputs(run_id, datasets=inputs),
                          f"logging dataset inputs of run {run_id}", retry_s)
    return uri, run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None,
                retry_s: float = 0.0) -> None:
    """Log a dict of metrics at one step, now; retried for up to ``retry_s`` seconds.

    Raises the MLflow error when they could not be sent.
    """
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    rows = [Metric(metric_name(k), float(v), ts, step or 0) for k, v in metrics.items()]
    client = _client(uri)

    def send():
        for i in range(0, len(rows), 500):
            client.log_batch(run_id, metrics=rows[i : i + 500])

    call_with_retries(send, f"logging metrics to run {run_id}", retry_s)


class MetricBuffer:
    """Collects per-step metrics (rank 0, driver) and sends them to MLflow without blocking.

    :meth:`flush` hands the queued metrics to a background thread and returns at once
    (or waits a bounded time, e.g. at a checkpoint, so that the metrics of the steps it
    covers are in MLflow before a failure could lose them);
    metrics that did not arrive (server unreachable, timeout) stay queued, in order, for
    the next flush. The first failure prints one warning and the first success after it
    one line saying how many buffered metrics went out: an outage is reported once, not
    per step. At most ``max_rows`` metrics are kept; beyond that the oldest are dropped
    and counted (``dropped``). :meth:`close` sends what is left, waiting a bounded time.
    """

    def __init__(self, uri: str, run_id: str, max_rows: int = 1_000_000) -> None:
        self.uri, self.run_id, self.max_rows = uri, run_id, max_rows
        self.rows: list = []
        """Metrics not yet sent, oldest first."""
        self.sent = 0
        """Metrics delivered so far."""
        self.dropped = 0
        """Metrics dropped because more than ``max_rows`` were waiting."""
        self.failing = False
        """True while the last send attempt failed."""
        self.outages = 0
        """Times the server went from reachable to unreachable (each reported once)."""
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._mlflow = None  # one client per buffer: making one costs seconds on a busy machine (SQLite store)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Queue ``metrics`` for ``step`` (timestamped now)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        new = [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items()]
        with self._lock:
            self.rows += new
            over = len(self.rows) - self.max_rows
            if over > 0:
                del self.rows[:over]
                self.dropped += over

    def flush(self, wait_s: float = 0.0) -> bool:
        """Send the queued metrics in a background thread (one send at a time).

        Returns at once by default. With ``wait_s`` > 0 it waits up to that long for a send
        already running, then for this one, and returns whether everything was sent. Never
        raises for an unreachable server.
        """
        deadline = time.monotonic() + wait_s
        if self._thread is not None and self._thread.is_alive() and wait_s > 0:
            self._thread.join(wait_s)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._send, name="mlflow-metrics", daemon=True)
            self._thread.start()
        if wait_s <= 0:
            return False
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return not self.rows and not self._thread.is_alive()

    def close(self, timeout_s: float = 60.0, retry_every_s: float = 2.0) -> int:
        """Flush until everything is sent or ``timeout_s`` has passed; returns the metrics left unsent."""
        deadline = time.monotonic() + timeout_s
        while not self.flush(wait_s=max(0.01, deadline - time.monotonic())):
            if time.monotonic() + retry_every_s > deadline:
                break
            time.sleep(retry_every_s)
        with self._lock:
            left = len(self.rows)
        if left:
            print(f"[tracking] {left} metrics of run {self.run_id} could not be sent to {self.uri} "
                  f"within {timeout_s:.0f}s and are lost", file=sys.stderr, flush=True)
        return left

    def _send(self) -> None:
        with self._lock:
            batch = list(self.rows)
        if not batch:
            return
        done = 0
        try:
            if self._mlflow is None:
                self._mlflow = _client(self.uri)
            client = self._mlflow
            for i in range(0, len(batch), 500):
                client.log_batch(self.run_id, metrics=batch[i : i + 500])
                done = min(len(batch), i + 500)
        except Exception as e:  # noqa: BLE001 -- any failure to deliver keeps the rows for later
            err = e
        else:
            err = None
        with self._lock:
            # add() only appends and drops from the front: the first rows are ours unless
            # some of them were dropped meanwhile.
            self._forget(batch[:done])
            if err is not None and not self.failing:
                self.failing = True
                self.outages += 1
                print(f"[tracking] MLflow at {self.uri} is unreachable ({_short(err)}); training goes on, "
                      f"metrics are buffered and sent when it is back (reported once)", file=sys.stderr, flush=True)
            elif err is None and self.failing:
                self.failing = False
                print(f"[tracking] MLflow at {self.uri} is reachable again; sent the buffered metrics",
                      file=sys.stderr, flush=True)

    def _forget(self, sent: list) -> None:
        ids = {id(m) for m in sent}
        n = len(self.rows)
        self.rows = [m for m in self.rows if id(m) not in ids]
        self.sent += n - len(self.rows)


def log_artifacts(uri: str, run_id: str, local_dir: str, artifact_path: str | None, retry_s: float = 0.0) -> None:
    """Upload a directory as artifacts of the run, retrying for up to ``retry_s`` seconds."""
    client = _client(uri)
    call_with_retries(lambda: client.log_artifacts(run_id, local_dir, artifact_path),
                      f"uploading {artifact_path} to run {run_id}", retry_s)


def find_run(uri: str, experiment: str, run_name: str, retry_s: float = 0.0) -> str | None:
    """Id of the newest run named ``run_name`` in ``experiment`` that did not finish, else None.

    A run ended FINISHED is never picked: a new job with that name starts a new run. Each
    call to the server is retried for up to ``retry_s`` seconds.
    """
    client = _client(uri)
    exp = call_with_retries(lambda: client.get_experiment_by_name(experiment),
                            f"looking up experiment '{experiment}' in {uri}", retry_s)
    if exp is None or not run_name:
        return None
    quoted = run_name.replace("'", "\\'")
    runs = call_with_retries(
        lambda: client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{quoted}'",
                                   order_by=["attributes.start_time DESC"], max_results=20),
        f"looking up run '{run_name}' in {uri}", retry_s)
    for run in runs:
        if run.info.status != "FINISHED":
            return run.info.run_id
    return None


def resume_run(uri: str, run_id: str, config_yaml: str, step: int, retry_s: float = 0.0) -> None:
    """Reopen run ``run_id`` (status RUNNING) for a job that continues it from ``step``.

    Params are not logged again (MLflow refuses changed values); the resumed job's config
    goes to ``config_resumed_step<step>.yaml`` and the tag ``resumed_from_step`` says where
    training picked up. Raises LookupError for an unknown run id. Each call to the server
    is retried for up to ``retry_s`` seconds (all of them are idempotent).
    """
    call_with_retries(lambda: get_run(uri, run_id), f"looking up run {run_id}", retry_s)
    client = _client(uri)
    call_with_retries(lambda: client.update_run(run_id, status="RUNNING"), f"reopening run {run_id}", retry_s)
    call_with_retries(lambda: client.set_tag(run_id, "resumed_from_step", str(step)),
                      f"tagging run {run_id}", retry_s)
    call_with_retries(lambda: client.log_text(run_id, config_yaml, f"config_resumed_step{step}.yaml"),
                      f"uploading the resumed config to run {run_id}", retry_s)


def open_run(cfg, config_yaml: str, name: str, latest: dict | None, inputs: list | None = None) -> tuple[str, str]:
    """The MLflow run of a training job: the one a previous job of run ``name`` left, else a new one.

    ``latest`` is the checkpoint the job resumes from (``pipeline.train.checkpoint.
    resume_point``): its ``run_id`` is reopened. Without one, an unfinished MLflow run named
    ``train.run_name`` (killed before its first checkpoint) is reopened, else a new run is
    started (with ``inputs``, see :func:`start_run`). Every call to the server is retried for
    up to ``tracking.retry_s`` seconds. Returns ``(tracking_uri, run_id)``.
    """
    uri = resolve_uri(cfg.tracking.uri)
    if latest is not None:
        run_id, step = latest["run_id"], int(latest["step"])
        print(f"[train] resuming run {run_id} ({name}) from step {step}", flush=True)
    else:
        run_id = (find_run(uri, cfg.tracking.experiment, cfg.train.run_name, cfg.tracking.retry_s)
                  if cfg.train.run_name else None)
        step = 0
        if run_id is not None:
            print(f"[train] resuming run {run_id} ({name}) from step 0: it has no checkpoint yet", flush=True)
    if run_id is None:
        return start_run(cfg, config_yaml, inputs=inputs)
    resume_run(uri, run_id, config_yaml, step, cfg.tracking.retry_s)
    return uri, run_id


def download_artifacts(uri: str, run_id: str, path: str, dst: str | None = None) -> str:
    """Download a run's artifact path; returns the local path."""
    return _client(uri).download_artifacts(run_id, path, dst or tempfile.mkdtemp(prefix="dml-"))


def end_run(uri: str, run_id: str, status: str = "FINISHED", retry_s: float = 0.0) -> None:
    """Mark the run FINISHED, FAILED or KILLED, retrying for up to ``retry_s`` seconds.

    Raises the MLflow error when the server stayed unreachable that long.
    """
    client = _client(uri)
    call_with_retries(lambda: client.set_terminated(run_id, status=status), f"ending run {run_id} {status}", retry_s)


def get_run(uri: str, run_id: str):
    """The MLflow run object; raises LookupError for an unknown id (an unreachable server raises MLflow's error)."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_run(run_id)
    except MlflowException as e:
        if getattr(e, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise LookupError(f"MLflow run '{run_id}' not found in '{uri}': {e.message}") from None


MODEL_ARTIFACT = "model"
"""Name of the MLflow model a training run logs: ``runs:/<run id>/model``."""


def log_inference_model(uri: str, run_id: str, model, example, name: str = MODEL_ARTIFACT,
                        registered_name: str = "", step: int = 0, retry_s: float = 0.0) -> dict:
    """Log ``model`` (a torch module: uint8 images -> embeddings) as MLflow model ``name`` of run ``run_id``.

    The pytorch flavour (``mlflow.pytorch.load_model("runs:/<id>/model")``) and pyfunc
    (``mlflow.pyfunc.load_model(...).predict(uint8 array)``), with a signature (uint8
    (-1, -1, -1, 3) -> float32 (-1, d), d from the model's output on ``example``) and
    ``example`` (a small uint8 numpy batch) as the input example. Serialised with pickle
    (MLflow's ``pt2`` export fixes the batch and image shapes of the example): loading runs
    this model's code, so load models only from stores you trust, as for any pickled model. The ``pipeline`` package travels inside the model (``code/``), so loading
    needs torch and torchvision but not this project; requirements are pinned to the torch,
    torchvision and numpy versions at hand (inferring them would re-import the model in a
    subprocess, tens of seconds). ``registered_name`` also registers it in the model
    registry (version 1, 2, ...). Returns ``{"model_uri", "model_id", "registered_version"}``.
    Retried for up to ``retry_s`` seconds; raises the MLflow error after that.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    import torchvision
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    example = np.ascontiguousarray(example)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    # Any batch size and any image side (the model resizes); 3 channels, uint8 in, float32 out.
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, output.shape[1]))]))
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"numpy=={np.__version__}"]
    client = _client(uri)
    # Made here, in the run's experiment: mlflow.pytorch.log_model would otherwise put it in
    # the fluent API's active experiment (the default one) with artifacts under ./mlruns.
    logged = call_with_retries(
        lambda: client.create_logged_model(client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id),
        f"creating model '{name}' of run {run_id}", retry_s)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        info = call_with_retries(
            lambda: mlflow.pytorch.log_model(
                model, name=name, model_id=logged.model_id, run_id=run_id, signature=signature, input_example=example, step=step,
                serialization_format="pickle", pip_requirements=reqs, code_paths=[str(Path(__file__).resolve().parent)],
                registered_model_name=registered_name or None),
            f"logging model '{name}' to run {run_id}", retry_s)
    finally:
        mlflow.set_tracking_uri(previous)
    version = getattr(info, "registered_model_version", None)
    return {"model_uri": f"runs:/{run_id}/{name}", "model_id": info.model_id,
            "registered_version": int(version) if version is not None else None}


class SystemMetrics:
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network; GPU
    through pynvml when it is installed) of the driver's machine, sampled every ``interval_s``
    into run ``run_id`` from :meth:`start` to :meth:`stop`. On a cluster that is the head node
    only. Never stops a job: a monitor that cannot start is reported once and skipped."""

    def __init__(self, uri: str, run_id: str, interval_s: float = 10.0) -> None:
        self.uri, self.run_id, self.interval_s = uri, run_id, interval_s
        self.monitor = None

    def start(self) -> SystemMetrics:
        """Start sampling in a background thread; returns self."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval_s,
                                                resume_logging=True, tracking_uri=self.uri)
            self.monitor.start()
        except Exception as e:  # noqa: BLE001 -- missing psutil, an odd platform: the run goes on without them
            print(f"[tracking] no system metrics: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.monitor = None
        return self

    def stop(self) -> None:
        """Log what was sampled and stop (idempotent)."""
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
