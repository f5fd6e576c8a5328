"""End to end: one short training run, then everything a user does with what it trained.

The logged MLflow model (pytorch and pyfunc flavours, the model registry) against the
checkpoint as ``jobs.evaluate`` embeds it; ``jobs.embed`` + ``jobs.search`` on the held-out
images; what the finished run shows in the MLflow store.
"""

from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tests.e2e.jobs import run_job

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
REGISTERED = "e2e-faces"



@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("use")
    out = run_job(["jobs.train", "--config", str(ROOT / "configs/quickstart.yaml"),
                f"data.train={tiny_shards}/train", f"data.eval={tiny_shards}/holdout", "data.image_size=32",
                f"train.steps={STEPS}", "train.log_every=2", "batch.classes_per_batch=4",
                f"tracking.register_model={REGISTERED}", "train.run_name=use"], cwd=work)
    return work, out


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
