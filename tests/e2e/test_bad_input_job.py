"""End to end: jobs.train on shards with undecodable JPEGs.

Below ``data.max_bad_fraction`` the job finishes, skips exactly the bad images, and logs the
counts (``data/*`` metrics) and ``data_report.json`` (file, key, reason) to its MLflow run.
Above it the job stops with exit 2 and an error naming the shard, the run ends FAILED, and
the report is still logged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
N_BAD = 3


@pytest.fixture(scope="module")
def bad_shards(tiny_shards, tmp_path_factory):
    """A copy of the tiny shard set whose first train shard has N_BAD undecodable JPEGs.

    The payloads are overwritten in place with junk of the same length between the JPEG
    markers (bit rot: the per-sample index still matches, the image does not decode).
    Returns (train dir, the bad shard's path, the report keys of the bad samples).
    """
    import numpy as np

    from pipeline.data.index import load_index

    out = tmp_path_factory.mktemp("bad") / "shards"
    shutil.copytree(tiny_shards, out)
    index = load_index(str(out), "train")
    shard = Path(out) / index.paths[0] if not Path(index.paths[0]).is_absolute() else Path(index.paths[0])
    raw = bytearray(shard.read_bytes())
    rows = np.flatnonzero(index.shard == 0)[[1, 4, 9]]
    for r in rows:
        o, n = int(index.offset[r]), int(index.size[r])
        raw[o:o + n] = (b"\xff\xd8\xff\xe0" + bytes(range(256)) * (n // 256 + 1))[: n - 2] + b"\xff\xd9"
    shard.write_bytes(bytes(raw))
    return out / "train", shard, {f"sample {int(r)}" for r in rows}


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
    # One pass. An image is decoded (and found bad) only once planned into a step; whatever
    # was found is counted (and replaced by a classmate), and only the injected images are ever bad.
    items = rep["items"]
    assert rep["counts"]["corrupt_image"] == len(items) <= N_BAD
    assert {(Path(i["shard"]).name, i["key"], i["reason"]) for i in items} <= {(shard.name, k, "corrupt_image") for k in bad}
    assert sum(n for r, n in rep["counts"].items() if r != "corrupt_image") == 0
    final = client.get_run(run_id).data.metrics
    assert final["data/bad_corrupt_image"] == rep["counts"]["corrupt_image"]
    assert final["data/samples_seen"] == rep["samples_seen"] > 0
    # The run's counts so far, at log steps from the first one after a bad image was seen
    # (a reason that never occurred gets no metric; step 8 also holds the driver's run-level total).
    hist = client.get_metric_history(run_id, "data/bad_corrupt_image")
    assert {m.step for m in hist} <= {4, 8} and 8 in {m.step for m in hist}
    assert all(0 < m.value <= rep["counts"]["corrupt_image"] for m in hist)
    assert not [k for k in final if k.startswith("data/bad_") and k not in
                ("data/bad_corrupt_image", "data/bad_total", "data/bad_fraction")]


def test_too_many_bad_images_stop_the_job_naming_the_shard(bad_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    train, shard, bad = bad_shards
    # The check starts once 200 samples were planned; 40 steps of 8 images get there before
    # training could end.
    p = _train(train, tmp_path, 40, "data.max_bad_fraction=0.001", "data.epochs=3")
    assert p.returncode == 2, f"expected exit 2, got {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    err = p.stderr.strip().splitlines()
    line = next(x for x in err if x.startswith("error: "))
    assert "data.max_bad_fraction=0.001" in line and shard.name in line and "corrupt_image" in line
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    rep = _report(client, run.info.run_id, tmp_path)
    # The planner stops at the first bad sample found once 200 samples are planned: 1 to N_BAD of them.
    assert 1 <= rep["counts"]["corrupt_image"] <= N_BAD and {i["key"] for i in rep["items"]} <= bad
