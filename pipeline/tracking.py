"""MLflow: the run's params, tags, config, metrics and artifacts.

Only the driver and rank 0 talk to MLflow. With no ``tracking.uri`` the store is a SQLite
file ``mlflow.db`` in the working directory, with artifacts under ``mlartifacts/`` beside
it (absolute paths, so Ray workers whose working directory differs write to the same store).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

DEFAULT_DB = "mlflow.db"


def metric_name(name: str) -> str:
    """An MLflow-legal metric name: ``recall@1`` -> ``recall_at_1``, ``tar@far=1e-03`` -> ``tar_at_far_1e-03``."""
    name = name.replace("@", "_at_")
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name).replace("__", "_")


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


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _git_commit() -> str:
    # A job submitted to Ray runs from an upload without .git; the submitter can pass it.
    if os.environ.get("DML_GIT_COMMIT"):
        return os.environ["DML_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def start_run(cfg, config_yaml: str, dataset: str = "") -> tuple[str, str]:
    """Create the MLflow run for a training job: tags, flat params, ``config.yaml`` artifact.

    Returns ``(tracking_uri, run_id)``.
    """
    from pipeline.config import to_flat_dict

    uri = resolve_uri(cfg.tracking.uri)
    client = _client(uri)
    tags = {
        "dataset": dataset or Path(cfg.data.train.rstrip("/")).parent.name or cfg.data.train,
        "loss": cfg.loss.name,
        "mining": "on" if cfg.miner.enabled else "off",
        "git_commit": _git_commit(),
        "world_size": str(cfg.scaling.num_workers),
        "backbone": cfg.model.backbone,
    }
    run = client.create_run(experiment_id(uri, cfg.tracking.experiment), run_name=cfg.train.run_name or None, tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in sorted(to_flat_dict(cfg).items())]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, config_yaml, "config.yaml")
    return uri, run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log a dict of metrics at one step."""
    buf = MetricBuffer(uri, run_id)
    buf.add(step or 0, metrics)
    buf.flush()


class MetricBuffer:
    """Collects per-step metrics on rank 0 and sends them to MLflow in batches."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.rows: list = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Queue ``metrics`` for ``step``."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.rows += [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items()]

    def flush(self) -> None:
        """Send the queued metrics."""
        client = _client(self.uri)
        for i in range(0, len(self.rows), 500):
            client.log_batch(self.run_id, metrics=self.rows[i : i + 500])
        self.rows = []


def log_artifacts(uri: str, run_id: str, local_dir: str, artifact_path: str) -> None:
    """Upload a directory as artifacts of the run."""
    _client(uri).log_artifacts(run_id, local_dir, artifact_path)


def download_artifacts(uri: str, run_id: str, path: str, dst: str | None = None) -> str:
    """Download a run's artifact path; returns the local path."""
    return _client(uri).download_artifacts(run_id, path, dst or tempfile.mkdtemp(prefix="dml-"))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    _client(uri).set_terminated(run_id, status=status)


def get_run(uri: str, run_id: str):
    """The MLflow run object; raises a clear error for an unknown id."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_run(run_id)
    except MlflowException as e:
        raise LookupError(f"MLflow run '{run_id}' not found in '{uri}': {e.message}") from None
