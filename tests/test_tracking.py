"""pipeline.tracking: URI resolution, metric names, and a run's life cycle on a real SQLite store."""

from __future__ import annotations

import pytest

from pipeline import tracking
from pipeline.config import dump_yaml, load_config


def test_resolve_uri_order(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert tracking.resolve_uri("") == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_uri("") == "http://127.0.0.1:5000"
    assert tracking.resolve_uri("sqlite:////x.db") == "sqlite:////x.db"


def test_default_store_is_refused_inside_a_ray_job(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ValueError, match="tracking.uri"):
        tracking.resolve_uri("")


@pytest.mark.parametrize("name,expected", [("recall@1", "recall_at_1"), ("tar@far=1e-03", "tar_at_far_1e-03"),
                                           ("map@r", "map_at_r"), ("train/loss", "train/loss")])
def test_metric_names_are_mlflow_legal(name, expected):
    assert tracking.metric_name(name) == expected


def test_run_life_cycle(monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DML_GIT_COMMIT", "abc1234")
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "tracking.experiment=t",
                             f"data.train={tmp_path}/ds/train", "loss.name=triplet"])
    uri, run_id = tracking.start_run(cfg, dump_yaml(cfg))
    tracking.log_metrics(uri, run_id, {"recall@1": 0.5, "nmi": 0.25}, step=7)
    tracking.end_run(uri, run_id, "KILLED")
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["git_commit"] == "abc1234" and run.data.tags["loss"] == "triplet"
    assert run.data.tags["dataset"] == "ds" and run.data.tags["mining"] == "off"
    assert run.data.params["loss.name"] == "triplet" and run.data.params["train.steps"] == "100"
    assert run.data.metrics == {"recall_at_1": 0.5, "nmi": 0.25}
    # Artifacts go next to the SQLite file, not into the working directory.
    assert MlflowClient(tracking_uri=uri).get_experiment(run.info.experiment_id).artifact_location.startswith(
        (tmp_path / "mlartifacts").as_uri())
