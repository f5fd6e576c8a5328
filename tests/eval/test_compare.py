"""jobs.compare on a real MLflow store: table values, filter, PNGs, comparison run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from jobs import compare


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    rng = np.random.default_rng(0)
    runs = {}
    for i, (loss, seed) in enumerate([("npair_mc", 0), ("npair_mc", 1), ("triplet", 0)]):
        r = client.create_run(exp, run_name=f"r{i}")
        rid = r.info.run_id
        for k, v in {"loss.name": loss, "train.seed": seed, "train.steps": 50, "tracking.uri": f"x{i}"}.items():
            client.log_param(rid, k, str(v))
        for step in range(1, 51):
            client.log_metric(rid, "train/loss", float(3 - step / 25 + rng.normal(0, 0.1)), step=step)
            if loss == "npair_mc":
                client.log_metric(rid, "mine/hardest_neg_sim_mean", float(step / 50), step=step)
        for k in (1, 2, 4, 8):
            client.log_metric(rid, f"recall_at_{k}", float(min(1.0, 0.2 * (i + 1) + 0.05 * k)), step=50)
        client.log_metric(rid, "nmi", 0.3 + i / 10, step=50)
        client.set_terminated(rid, "FINISHED")
        runs[rid] = (loss, seed, i)
    return uri, client, runs


def test_compare_table_matches_store_and_plots_are_images(store, tmp_path, capsys):
    uri, client, runs = store
    out = tmp_path / "out"
    assert compare.main(["--experiment", "cmp", "--out", str(out), "--tracking-uri", uri]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(res["runs"]) == sorted(runs)

    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    # Only the params that differ (and are not bookkeeping such as tracking.uri) are columns.
    assert {"loss.name", "train.seed"} <= set(rows[0]) and "train.steps" not in rows[0] and "tracking.uri" not in rows[0]
    for row in rows:
        stored = client.get_run(row["run_id"]).data
        assert row["loss.name"] == stored.params["loss.name"]
        for k in ("recall_at_1", "recall_at_8", "nmi"):
            assert float(row[k]) == pytest.approx(stored.metrics[k], abs=1e-12)
    md = (out / "comparison.md").read_text()
    assert md.count("\n") == 5 and "recall_at_1" in md

    for name in ("loss_curves.png", "recall_at_k.png", "mining.png"):
        with Image.open(out / name) as im:
            assert im.size[0] >= 500 and im.size[1] >= 300
            assert len(set(im.convert("L").tobytes())) > 20  # not a blank canvas

    cmp_run = client.get_run(res["comparison_run_id"])
    assert cmp_run.data.tags["dml.kind"] == "comparison" and cmp_run.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(res["comparison_run_id"], "comparison")}
    assert {"comparison/comparison.csv", "comparison/loss_curves.png", "comparison/recall_at_k.png"} <= arts


def test_compare_filter_and_explicit_runs(store, tmp_path, capsys):
    uri, client, runs = store
    assert compare.main(["--experiment", "cmp", "--filter", "params.loss.name = 'npair_mc'",
                         "--out", str(tmp_path / "a"), "--tracking-uri", uri]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(res["runs"]) == sorted(r for r, v in runs.items() if v[0] == "npair_mc")
    # The comparison run of the first call is not itself compared by the second.
    assert compare.main(["--experiment", "cmp", "--out", str(tmp_path / "b"), "--tracking-uri", uri]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]) == 3
    one = next(iter(runs))
    assert compare.main(["--runs", one, "--out", str(tmp_path / "c"), "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"] == [one]


def test_compare_errors_name_the_problem(store, tmp_path, capsys):
    uri, _, _ = store
    assert compare.main(["--experiment", "nope", "--out", str(tmp_path), "--tracking-uri", uri]) == 2
    assert "nope" in capsys.readouterr().err
    assert compare.main(["--experiment", "cmp", "--filter", "params.loss.name === 1", "--out", str(tmp_path),
                         "--tracking-uri", uri]) == 2
    assert "filter" in capsys.readouterr().err
