"""End to end: one short training run, then everything a user does with what it trained.

The logged MLflow model (pytorch and pyfunc flavours, the model registry) against the
checkpoint as ``jobs.evaluate`` embeds it; ``jobs.embed`` + ``jobs.search`` on the held-out
images; what the finished run shows in the MLflow store.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import REGISTERED
from tests.e2e.jobs import run_job

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(quickstart_run):
    """The shared short training run (tests/e2e/conftest.py; test_quickstart.py and test_learning.py read it too)."""
    return quickstart_run


def _holdout_images(shards: Path) -> dict[str, bytes]:
    """Shard key -> JPEG bytes of every held-out sample."""
    out = {}
    for tar in sorted((shards / "holdout").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name[: -len(".jpg")]] = t.extractfile(m).read()
    return out


def test_logged_model_embeds_like_the_evaluation(trained, tiny_shards, ray_local):
    """runs:/<id>/model (pytorch and pyfunc) and models:/NAME/1 give the evaluation's embeddings, unit norm."""
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.data.decode import decode_images
    from pipeline.eval.embed import embed_shards

    work, out = trained
    uri = f"sqlite:///{work / 'mlflow.db'}"
    run_id = out["run_id"]
    client = MlflowClient(uri)
    ckpt = client.download_artifacts(run_id, "checkpoint/model.pt", str(work))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"), ["data.image_size=32"])
    # What jobs.evaluate computes: embed_shards with the checkpoint's weights (then cosine).
    emb, labels, keys = embed_shards(f"{tiny_shards}/holdout", dataclasses.asdict(cfg.model), state, 32)
    ref = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    jpgs = _holdout_images(tiny_shards)
    images, ok = decode_images([jpgs[k] for k in keys], 32)
    assert ok.all() and images.shape == (160, 32, 32, 3) and images.dtype == np.uint8

    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        got = model(torch.from_numpy(images)).numpy()
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(images)
        registered = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1").predict(images[:8])
    finally:
        mlflow.set_tracking_uri(None)
    assert got.dtype == np.float32 and got.shape == (160, 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(pyfunc, ref, atol=1e-5)
    np.testing.assert_allclose(registered, ref[:8], atol=1e-5)
    assert out["model"] == {"model_uri": f"runs:/{run_id}/model", "registered_version": 1,
                            "model_id": out["model"]["model_id"]}


def _export_folder(jpgs: dict[str, bytes], root: Path, keys) -> list[str]:
    """Write images as ROOT/<class name>/<key>.jpg (shard keys are <class id>_<class name>_<nnnn>)."""
    out = []
    for key in keys:
        path = root / key.split("_")[1] / f"{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpgs[key])
        out.append(path.relative_to(root).as_posix())
    return out


def test_embed_then_search_the_held_out_images(trained, tiny_shards):
    """jobs.embed on the held-out images, jobs.search with 20 of them: Recall@1 = recall_at_k, and matches.png."""
    from PIL import Image

    from pipeline.eval.gallery import read_gallery
    from pipeline.eval.retrieval import recall_at_k

    work, out = trained
    jpgs = _holdout_images(tiny_shards)
    keys = sorted(jpgs)
    _export_folder(jpgs, work / "holdout_images", keys)
    queries = _export_folder(jpgs, work / "queries", keys[::8][:20])  # 20 held-out images, their own files
    model = out["model"]["model_uri"]
    emb = run_job(["jobs.embed", "--model", model, "--images", str(work / "holdout_images"),
                   "--out", str(work / "gallery.parquet")], cwd=work)
    assert emb == {"out": str(work / "gallery.parquet"), "images": 160, "dim": 64, "skipped": 0, "model": model}
    gallery = read_gallery(work / "gallery.parquet")
    assert sorted(gallery["key"]) == sorted(f"{k.split('_')[1]}/{k}.jpg" for k in keys)
    assert all(lab == k.split("/")[0] for k, lab in zip(gallery["key"], gallery["label"]))
    np.testing.assert_allclose(np.linalg.norm(gallery["embedding"], axis=1), 1.0, atol=1e-5)

    # Every gallery image as a query (itself excluded): the search's Recall@1 is recall_at_k's.
    labels = np.asarray(gallery["label"]).astype(str)
    want = recall_at_k(gallery["embedding"], labels, ks=(1, 5))
    whole = run_job(["jobs.search", "--gallery", str(work / "gallery.parquet"), "--query", str(work / "gallery.parquet"),
                     "--exclude-self", "--k", "5", "--out", str(work / "search_all"),
                     "--index", str(work / "gallery.faiss")], cwd=work)
    assert whole["queries"] == 160 and whole["recall_at_1"] == pytest.approx(want[1], abs=1e-12)
    assert whole["recall_at_5"] == pytest.approx(want[5], abs=1e-12)
    assert (work / "gallery.faiss").stat().st_size > 160 * 64 * 4

    # 20 query images (embedded by jobs.search with the gallery's model), the saved index reloaded.
    res = run_job(["jobs.search", "--gallery", str(work / "gallery.parquet"), "--query-images", str(work / "queries"),
                   "--exclude-self", "--k", "5", "--out", str(work / "search"),
                   "--index", str(work / "gallery.faiss")], cwd=work)
    lines = [json.loads(x) for x in (work / "search/results.jsonl").read_text().splitlines()]
    assert res["queries"] == len(lines) == 20 and sorted(x["query"] for x in lines) == sorted(queries)
    row = {k: i for i, k in enumerate(gallery["key"])}
    sims = gallery["embedding"] @ gallery["embedding"].T
    np.fill_diagonal(sims, -np.inf)  # the query's own gallery row is excluded
    hits = []
    for x in lines:
        assert len(x["matches"]) == 5 and x["label"] == x["query"].split("/")[0]
        assert all(a["score"] >= b["score"] for a, b in zip(x["matches"], x["matches"][1:]))
        best = int(np.argmax(sims[row[x["query"]]]))
        assert x["matches"][0]["score"] == pytest.approx(float(sims[row[x["query"]], best]), abs=1e-5)
        hits.append(x["matches"][0]["label"] == x["label"])
    assert res["recall_at_1"] == pytest.approx(float(np.mean(hits)), abs=1e-12)

    with Image.open(work / "search/matches.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[0] > 20 * 96 and rgb.shape[1] > 6 * 96  # 20 rows, query + 5 matches each
    assert rgb.std() > 20  # not blank
    green = ((rgb == (0, 170, 0)).all(axis=2)).sum()
    red = ((rgb == (220, 0, 0)).all(axis=2)).sum()
    n_right = sum(m["label"] == x["label"] for x in lines for m in x["matches"])
    frame_px = (96 + 12) ** 2 - 96 ** 2  # one 6-pixel frame around a 96-pixel image
    # Frames of exactly these colours, one per match (a stray image pixel of the same colour is allowed).
    assert abs(green - n_right * frame_px) < frame_px // 2 and abs(red - (100 - n_right) * frame_px) < frame_px // 2


def test_the_finished_run_shows_what_mlflow_users_look_for(trained):
    """Logged model, dataset inputs, mlflow.source.* tags, a description, system metrics, no mine/* (mining off), plots."""
    import hashlib

    from mlflow.tracking import MlflowClient
    from PIL import Image

    work, out = trained
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(out["run_id"])
    tags, metrics = run.data.tags, run.data.metrics

    models = client.search_logged_models([run.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", out["run_id"])]
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
    assert client.get_model_version(REGISTERED, "1").run_id == out["run_id"]

    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["eval", "train"]
    assert inputs["train"].name.endswith("/train") and inputs["eval"].name.endswith("/holdout")
    for context, split in (("train", "train"), ("eval", "holdout")):
        ds = inputs[context]
        src = Path(json.loads(ds.source)["uri"])
        man = json.loads((src.parent / "manifest.json").read_text())
        shards = sorted((s["path"], s["sha256"]) for s in man["shards"] if s["split"] == split)
        want = hashlib.sha256("\n".join(f"{p} {h}" for p, h in shards).encode()).hexdigest()[:16]
        assert ds.digest == want and json.loads(ds.profile)["images"] == 160

    commit = tags["mlflow.source.git.commit"]
    assert len(commit) == 40 and int(commit, 16) >= 0 and commit.startswith(tags["git_commit"])
    assert tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    note = tags["mlflow.note.content"]
    assert "small" in note and "npair_mc" in note and "N=4 classes x M=2" in note and "mining off" in note
    assert "2 CPU workers" in note

    system = [k for k in metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    assert 0 < metrics["system/cpu_utilization_percentage"] <= 100
    assert not [k for k in metrics if k.startswith("mine/")]
    zero_reasons = [k for k in metrics if k.startswith("data/bad_") and k not in ("data/bad_total", "data/bad_fraction")]
    assert zero_reasons == [] and metrics["data/bad_total"] == 0  # clean data: totals only
    assert metrics["train_loss"] == pytest.approx(out["metrics"]["train_loss"])
    from pipeline.eval.compare import SUMMARY_METRICS

    assert set(SUMMARY_METRICS) <= set(metrics)  # every column of jobs.compare's table exists
    assert out["metrics"]["recall_at_1"] == out["metrics"]["recall@1"] == pytest.approx(metrics["recall_at_1"])

    arts = {a.path for a in client.list_artifacts(out["run_id"], "eval/retrieval")}
    assert arts == {"eval/retrieval/recall_at_k.png", "eval/retrieval/matches.png"}
    with Image.open(client.download_artifacts(out["run_id"], "eval/retrieval/matches.png", str(work))) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[0] > 16 * 96 and rgb.std() > 20
    assert ((rgb == (0, 170, 0)).all(axis=2) | (rgb == (220, 0, 0)).all(axis=2)).sum() >= 16 * 5 * 2000
