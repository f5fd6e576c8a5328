"""End to end: jobs.train on a local Ray cluster (2 workers) -> MLflow run -> jobs.evaluate.

Runs the real commands in subprocesses, as the README does, on a tiny shard set.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.e2e.conftest import QS_EVERY, QS_STEPS
from tests.e2e.jobs import run_job

pytestmark = pytest.mark.e2e
STEPS = QS_STEPS
INTERVALS = list(range(QS_EVERY, QS_STEPS + 1, QS_EVERY))  # 25, 50, 75, 100



@pytest.fixture(scope="module")
def trained(quickstart_run):
    return quickstart_run


def test_train_reports_metrics_and_tracks_the_run(trained):
    from mlflow.tracking import MlflowClient

    work, out = trained
    m = out["metrics"]
    for k in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "untrained_recall@1"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["recall@1"] <= m["recall@2"] <= m["recall@4"] <= m["recall@8"]
    assert m["num_eval_images"] == 160 and m["num_eval_classes"] == 20

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["loss.name"] == "npair_mc"
    assert run.data.tags["loss"] == "npair_mc" and run.data.tags["world_size"] == "2"
    history = client.get_metric_history(out["run_id"], "train/loss")
    assert sorted(h.step for h in history) == INTERVALS  # the mean of each log interval
    assert all(h.value > 0 for h in history)
    lr = client.get_metric_history(out["run_id"], "train/lr")
    assert sorted(h.step for h in lr) == INTERVALS and all(h.value == pytest.approx(1e-3) for h in lr)
    assert run.data.metrics["recall_at_1"] == pytest.approx(m["recall@1"])

    arts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"config.yaml", "checkpoint"} <= arts
    ckpt = client.download_artifacts(out["run_id"], "checkpoint/model.pt", str(work))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == out["metrics"]["best_step"] and state["run_id"] == out["run_id"]
    assert state["model"]["head.weight"].shape == (64, 256)  # embedding 64 x the small backbone's 256 features


def test_evaluations_during_training_pick_the_best_checkpoint(trained):
    """eval.every=25: recall_at_1 at steps 25, 50, 75, 100; the run's model and final metrics are the best step's."""
    from mlflow.tracking import MlflowClient

    work, out = trained
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    history = client.get_metric_history(out["run_id"], "recall_at_1")
    during = {h.step: h.value for h in history if h.step < STEPS}
    last = sorted((h for h in history if h.step == STEPS), key=lambda h: h.timestamp)
    assert sorted(during) == INTERVALS[:-1] and len(last) == 2  # the last step: its evaluation, then the final metrics
    during[STEPS] = last[0].value
    best_step = max(during, key=lambda s: (during[s], s))  # ties: the later step, as the driver picks
    m = out["metrics"]
    assert m["best_step"] == best_step and m["best_recall@1"] == pytest.approx(during[best_step])
    # The held-out set (160 images) is smaller than eval.max_images, so the end-of-run evaluation (Ray
    # Data, all of data.eval) sees the same images as the one during training: the same Recall@1.
    assert m["recall@1"] == pytest.approx(during[best_step], abs=1.5 / 160)
    assert [h.step for h in client.get_metric_history(out["run_id"], "eval/seconds")] == INTERVALS
    # The logged checkpoint and model are the best step's.
    ckpt = client.download_artifacts(out["run_id"], "checkpoint/model.pt", str(work / "best"))
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == best_step


def test_evaluate_job_reproduces_the_run_metrics(trained):
    work, out = trained
    ev = run_job(["jobs.evaluate", "--run-id", out["run_id"]], cwd=work)
    assert ev["run_id"] == out["run_id"]
    assert ev["metrics"]["recall@1"] == pytest.approx(out["metrics"]["recall@1"], abs=1e-9)
    assert ev["metrics"]["num_eval_images"] == 160


def test_evaluate_job_verification_protocol(trained, tiny_shards):
    """An LFW-format pairs.txt over the held-out images (the VehicleID protocol is run by
    test_vehicleid_mixed_diff.py on a VehicleID-format tree).

    Synthetic images are named like LFW's: ``<identity>_<nnnn>`` (0-based here).
    """
    from mlflow.tracking import MlflowClient

    work, out = trained
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    hold = [c["name"] for c in manifest["classes"] if c["split"] == "holdout"]
    lines = ["10\t1"]
    for f in range(10):
        a, b = hold[f % len(hold)], hold[(f + 1) % len(hold)]
        lines += [f"{a}\t1\t2", f"{a}\t1\t{b}\t3"]
    (work / "pairs.txt").write_text("\n".join(lines) + "\n")
    ver = run_job(["jobs.evaluate", "--run-id", out["run_id"], "--protocol", "verification",
                "--pairs", str(work / "pairs.txt")], cwd=work)
    acc = ver["metrics"]["lfw_accuracy"]
    assert ver["protocol"] == "verification" and 0.0 <= acc <= 1.0
    # 10 folds of 1 matched + 1 mismatched pair: each fold's accuracy is 0, 0.5 or 1.
    assert (acc * 20) == pytest.approx(round(acc * 20))

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(out["run_id"])
    assert run.data.metrics["verification/lfw_accuracy"] == pytest.approx(acc)
    from PIL import Image

    png = client.download_artifacts(out["run_id"], "eval/verification/roc.png", str(work))
    with Image.open(png) as im:
        assert im.size == (500, 400) and len(set(im.convert("L").tobytes())) > 10
