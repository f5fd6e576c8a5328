"""End to end: jobs.train on shards with undecodable JPEGs.

Below ``data.max_bad_fraction`` the job finishes, skips exactly the bad images, and logs the
counts (``data/*`` metrics) and ``data_report.json`` (file, key, reason) to its MLflow run.
Above it the job stops with exit 2 and an error naming the shard, the run ends FAILED, and
the report is still logged.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
CORRUPT = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3 + b"\xff\xd9"  # JPEG markers around junk: fails to decode
N_BAD = 3


@pytest.fixture(scope="module")
def bad_shards(tiny_shards, tmp_path_factory):
    """A copy of the tiny shard set whose first train shard has N_BAD undecodable JPEGs.

    Returns (train dir, the bad shard's path, the bad keys).
    """
    out = tmp_path_factory.mktemp("bad") / "shards"
    shutil.copytree(tiny_shards, out)
    shard = sorted((out / "train").glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    keys = sorted({n.split(".", 1)[0] for n, _ in members})
    bad = {keys[1], keys[4], keys[9]}
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            if name.endswith(".jpg") and name.split(".", 1)[0] in bad:
                data = CORRUPT
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out / "train", shard, bad


def _train(train: Path, cwd: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    args = ["jobs.train", "--config", str(Path(__file__).parents[2] / "configs/quickstart.yaml"),
            f"data.train={train}", "data.eval=", "data.image_size=32", f"train.steps={steps}", "train.log_every=4",
            "batch.classes_per_batch=4", "miner.pool_classes=8", *extra]
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env)


def _report(client, run_id: str, tmp: Path) -> dict:
    path = client.download_artifacts(run_id, "data_report.json", str(tmp))
    return json.loads(Path(path).read_text())


def test_bad_images_are_skipped_counted_and_reported(bad_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    train, shard, bad = bad_shards
    p = _train(train, tmp_path, 8, "data.max_bad_fraction=0.5", "data.epochs=1")
    assert p.returncode == 0, f"jobs.train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    run_id = json.loads(p.stdout.strip().splitlines()[-1])["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    rep = _report(client, run_id, tmp_path)
    # One pass. An image is decoded (and found bad) only once composed into a batch: one left in
    # the pool when the pass ends is never decoded; whatever was found is counted, and only the
    # injected images are ever bad.
    items = rep["items"]
    assert rep["counts"]["corrupt_image"] == len(items) <= N_BAD
    assert {(Path(i["shard"]).name, i["key"], i["reason"]) for i in items} <= {(shard.name, k, "corrupt_image") for k in bad}
    assert sum(n for r, n in rep["counts"].items() if r != "corrupt_image") == 0
    final = client.get_run(run_id).data.metrics
    assert final["data/bad_corrupt_image"] == rep["counts"]["corrupt_image"]
    assert final["data/samples_seen"] == rep["samples_seen"] > 0
    # Per-step (cumulative) counts from the rows rank 0 trained on, at log steps (step 8 also
    # holds the driver's run-level total).
    hist = client.get_metric_history(run_id, "data/bad_corrupt_image")
    assert sorted({m.step for m in hist}) == [4, 8]
    assert all(0 <= m.value <= rep["counts"]["corrupt_image"] for m in hist)


def test_too_many_bad_images_stop_the_job_naming_the_shard(bad_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    train, shard, bad = bad_shards
    # The check starts once 200 samples were seen; 40 steps of 8 images need 2 passes over the
    # 160-image train split, so the stream gets there before training could end.
    p = _train(train, tmp_path, 40, "data.max_bad_fraction=0.001", "data.epochs=3")
    assert p.returncode == 2, f"expected exit 2, got {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    err = p.stderr.strip().splitlines()
    line = next(x for x in err if x.startswith("error: "))
    assert "data.max_bad_fraction=0.001" in line and shard.name in line and "corrupt_image" in line
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    rep = _report(client, run.info.run_id, tmp_path)
    assert rep["counts"]["corrupt_image"] >= N_BAD and {i["key"] for i in rep["items"]} <= bad
