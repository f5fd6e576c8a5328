"""Evaluate weights on a held-out shard set: embed with Ray Data, then retrieval metrics."""

from __future__ import annotations

import dataclasses
import os

import torch

from pipeline.config import Config


def initial_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The untrained network's weights: what every worker starts from (same seed, same init)."""
    from pipeline.models import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model).state_dict()


def evaluate_state(cfg: Config, state: dict, data: str) -> dict[str, float]:
    """Embed the shards at ``data`` with ``state`` and return Recall@K (``eval.ks``), NMI, F1, MAP@R.

    Keys: ``recall@{k}``, ``nmi``, ``f1``, ``map@r``, ``num_eval_images``, ``num_eval_classes``.
    """
    import numpy as np

    from pipeline.eval.embed import embed_shards
    from pipeline.eval.retrieval import retrieval_metrics

    emb, labels = embed_shards(
        data, dataclasses.asdict(cfg.model), state, cfg.data.image_size, cfg.eval.batch_size,
        concurrency=max(1, min(4, (os.cpu_count() or 1))), use_gpu=cfg.scaling.use_gpu,
    )
    out = retrieval_metrics(emb, labels, ks=tuple(cfg.eval.ks), seed=cfg.train.seed)
    out["num_eval_images"] = float(len(labels))
    out["num_eval_classes"] = float(len(np.unique(labels)))
    return out


def evaluate_run(run_id: str, data: str = "", tracking_uri: str = "") -> dict:
    """Evaluate a finished run's checkpoint (from MLflow) and log the metrics to the same run.

    ``data`` defaults to the run's ``data.eval``. Returns ``{"run_id", "metrics"}``.
    Raises LookupError for an unknown run and FileNotFoundError when it has no checkpoint.
    """
    import yaml

    from pipeline import tracking
    from pipeline.config import config_from_dict
    from pipeline.train.driver import init_ray
    from pipeline.train.loop import CKPT_FILE, load_checkpoint

    uri = tracking.resolve_uri(tracking_uri)
    run = tracking.get_run(uri, run_id)
    try:
        cfg = config_from_dict(yaml.safe_load(open(tracking.download_artifacts(uri, run_id, "config.yaml"))))
        ckpt = tracking.download_artifacts(uri, run_id, f"checkpoint/{CKPT_FILE}")
    except Exception as e:  # MLflow raises several types for a missing artifact
        raise FileNotFoundError(f"run '{run_id}' has no config.yaml or checkpoint/{CKPT_FILE} artifact: {e}") from None
    data = data or cfg.data.eval
    if not data:
        raise ValueError(f"run '{run_id}' has no data.eval; pass --data SHARDS")
    init_ray(cfg)
    metrics = evaluate_state(cfg, load_checkpoint(ckpt)["model"], data)
    step = int(run.data.params.get("train.steps", 0))
    tracking.log_metrics(uri, run_id, metrics, step=step)
    return {"run_id": run_id, "metrics": metrics}
