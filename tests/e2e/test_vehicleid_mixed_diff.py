"""jobs.train with configs/vehicleid_mixed_diff.yaml on a tiny VehicleID-format tree, then the VehicleID protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]


def _run(args: list[str], cwd: Path) -> dict:
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.fixture(scope="module")
def vehicleid_shards(tmp_path_factory):
    """16 train + 8 test vehicles x 6 images in the release's layout; models known for 2/3 of them."""
    root = tmp_path_factory.mktemp("VehicleID_V1.0")
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    models = []
    for vid in range(1, 25):
        base = rng.integers(0, 255, size=3)
        for j in range(6):
            name = f"{vid:04d}{j:03d}"
            arr = np.clip(base + rng.normal(0, 20, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            (root / "image").mkdir(exist_ok=True)
            Image.fromarray(arr).save(root / "image" / f"{name}.jpg", quality=90)
            lines["train" if vid <= 16 else "test"].append(f"{name} {vid}")
        if vid % 3:
            models.append(f"{vid} {vid % 5}")
    split = root / "train_test_split"
    split.mkdir()
    (split / "train_list.txt").write_text("\n".join(lines["train"]) + "\n")
    (split / "test_list_800.txt").write_text("\n".join(lines["test"]) + "\n")
    (root / "attribute").mkdir()
    (root / "attribute" / "model_attr.txt").write_text("\n".join(models) + "\n")
    (root / "attribute" / "color_attr.txt").write_text("\n".join(f"{v} {v % 3}" for v in range(1, 25)) + "\n")
    out = tmp_path_factory.mktemp("vid_shards")
    _run(["jobs.make_shards", "--layout", "vehicleid", "--src", str(root), "--out", str(out), "--image-size", "32"],
         cwd=ROOT)
    return out


def test_mixed_difference_network_trains_logs_both_branches_and_evaluates(vehicleid_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    out = _run(["jobs.train", "--config", str(ROOT / "configs/vehicleid_mixed_diff.yaml"),
                f"data.train={vehicleid_shards}/train", "data.eval=", "data.image_size=32", "data.decode_concurrency=1",
                "model.backbone=tiny", "model.num_vehicle_models=5", "scaling.use_gpu=false", "scaling.num_workers=2",
                "batch.classes_per_batch=4", "miner.pool_classes=8", "train.steps=5", "train.log_every=1",
                "train.checkpoint_every=0"], cwd=tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = out["run_id"]
    ce = client.get_metric_history(run_id, "train/model_ce")
    metric = client.get_metric_history(run_id, "train/metric_loss")
    total = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(m.step for m in ce) == sorted(m.step for m in metric) == [1, 2, 3, 4, 5]
    # Model labels 0..4 are known for 2/3 of the vehicles: the cross-entropy is near log(5)
    # on steps whose rank-0 batch has a known model, exactly 0 on steps where none is known.
    assert all(0.0 <= c.value < 10.0 for c in ce) and max(c.value for c in ce) > 0.3
    for c, m in zip(sorted(ce, key=lambda x: x.step), sorted(metric, key=lambda x: x.step)):
        assert total[c.step] == pytest.approx(m.value + 1.0 * c.value, rel=1e-5)  # loss.model_branch_weight = 1

    ev = _run(["jobs.evaluate", "--run-id", run_id, "--protocol", "vehicleid", "--data", f"{vehicleid_shards}/holdout",
               "--test-list", f"{vehicleid_shards}/test_list_800.txt"], cwd=tmp_path)
    m = ev["metrics"]
    assert m["num_eval_images"] == 48 and 0.0 <= m["top1"] <= m["top5"] <= 1.0
    assert max(m["top1"], 1 / 8) - 1e-9 <= m["map"] <= 1.0
    # The protocol's results land in the training run.
    run = client.get_run(run_id)
    assert run.data.metrics["vehicleid/top1"] == pytest.approx(m["top1"])
    assert "eval/vehicleid/cmc.png" in {a.path for a in client.list_artifacts(run_id, "eval/vehicleid")}
