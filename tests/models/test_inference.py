"""The logged model: InferenceModel's contract, and its round trip through a real MLflow store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models.factory import build_model
from pipeline.models.inference import InferenceModel, example_images, inference_model


def _net(seed: int = 0, **kw) -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(backbone="tiny", embedding_dim=16, **kw)
    torch.manual_seed(seed)
    return cfg, build_model(cfg).state_dict()


def test_unit_norm_embeddings_equal_the_network_normalised():
    cfg, state = _net()
    model = inference_model(cfg, state, 32)
    net = build_model(cfg)
    net.load_state_dict(state)
    net.eval()
    x = example_images(32, n=6, seed=3)
    out = model(torch.from_numpy(x))
    assert out.dtype == torch.float32 and out.shape == (6, 16)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-6)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net(torch.from_numpy(x)), dim=1)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-6)


def test_batch_independent_and_stays_in_eval_mode():
    cfg, state = _net()
    model = inference_model(cfg, state, 32)
    model.train()  # ignored: BatchNorm must keep its running statistics
    assert not model.training and not model.net.training
    x = torch.from_numpy(example_images(32, n=5, seed=4))
    np.testing.assert_allclose(model(x[:1]).numpy(), model(x)[:1].numpy(), atol=1e-6)


def test_other_sizes_are_resized_and_bad_input_is_refused():
    cfg, state = _net()
    model = inference_model(cfg, state, 32)
    big = torch.from_numpy(example_images(64, n=2, seed=5))
    from torchvision.transforms.v2.functional import resize

    small = resize(big.permute(0, 3, 1, 2), [32, 32], antialias=True).permute(0, 2, 3, 1)
    np.testing.assert_allclose(model(big).numpy(), model(small.contiguous()).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="uint8 images of shape"):
        model(big.float())
    with pytest.raises(ValueError, match="uint8 images of shape"):
        model(big[..., :1])


def test_log_load_pyfunc_and_registry_round_trip(tmp_path):
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.experiment_id(uri, "t")).info.run_id
    cfg, state = _net()
    model = inference_model(cfg, state, 32)
    info = tracking.log_inference_model(uri, run_id, model, example_images(32), registered_name="faces", step=7)
    assert info["model_uri"] == f"runs:/{run_id}/model" and info["registered_version"] == 1
    logged = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert [(m.name, m.source_run_id) for m in logged] == [("model", run_id)]
    assert not (tmp_path / "mlruns").exists()  # artifacts beside the store, not in the cwd

    x = example_images(40, n=3, seed=9)  # another size: the model resizes
    want = model(torch.from_numpy(x)).numpy()
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        assert isinstance(loaded, InferenceModel) and not loaded.training
        np.testing.assert_allclose(loaded(torch.from_numpy(x)).numpy(), want, atol=1e-6)
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        got = pyfunc.predict(x)
        assert got.dtype == np.float32 and got.shape == (3, 16)
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_allclose(mlflow.pyfunc.load_model("models:/faces/1").predict(x), want, atol=1e-6)
        spec = pyfunc.metadata.get_input_schema().inputs[0]
        assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, -1, -1, 3)
        assert pyfunc.metadata.get_output_schema().inputs[0].shape == (-1, 16)
    finally:
        mlflow.set_tracking_uri(None)
