"""Evaluate weights on a shard set: embed with Ray Data, then one of the seeds' protocols.

Protocols:
  * ``retrieval`` (Sohn 2016 on unseen classes): Recall@K, NMI, F1, MAP@R.
  * ``verification`` (LFW): 10-fold pair accuracy, TAR@FAR, ROC (plot); pairs from a
    ``pairs.txt``; images are matched by file stem (``<name>_<nnnn>``).
  * ``vehicleid`` (Liu et al. 2016): one random gallery image per vehicle, 10 repeats,
    CMC Top-1/Top-5 (plot) and mAP; vehicles and images from a ``test_list_*.txt``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config

PROTOCOLS = ("retrieval", "verification", "vehicleid")

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
"""Where a training run keeps its final checkpoint in MLflow (``pipeline.train.checkpoint``'s ``model.pt``,
loaded here with ``weights_only=True``; only its ``model`` entry is used)."""


def _embed(cfg: Config, state: dict, data: str, with_sources: bool = False):
    from pipeline.eval.embed import embed_shards

    return embed_shards(
        data, dataclasses.asdict(cfg.model), state, cfg.data.image_size, cfg.eval.batch_size,
        concurrency=max(1, min(4, (os.cpu_count() or 1))), use_gpu=cfg.scaling.use_gpu, with_sources=with_sources,
    )


def _stem(key: str) -> str:
    """Shard key ``<class id>_<image stem>`` -> image stem."""
    return key.split("_", 1)[1] if "_" in key else key


def _rows_for(names: list[str], keys: np.ndarray, source: str) -> np.ndarray:
    index = {_stem(k): i for i, k in enumerate(keys)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{len(missing)} images named in '{source}' are not in the shards "
                         f"(first: {missing[:3]}); check --data")
    return np.asarray([index[n] for n in names])


def _plot(path: Path, x, y, xlabel: str, ylabel: str, title: str, log_x: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(x, y, lw=2)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate_state(cfg: Config, state: dict, data: str, protocol: str = "retrieval", pairs: str = "",
                   test_list: str = "", plot_dir: str | None = None) -> dict[str, float]:
    """Embed the shards at ``data`` with ``state`` and run ``protocol``.

    Returns scalar metrics: retrieval -> ``recall@{k}`` (``eval.ks``), ``nmi``, ``f1``, ``map@r``;
    verification -> ``lfw_accuracy``, ``lfw_accuracy_std``, ``tar@far=1e-03``, ``tar@far=1e-04``,
    ``auc``; vehicleid -> ``top1``, ``top5`` (+ ``_std``), ``map``. Plots are written to
    ``plot_dir`` when given: retrieval ``recall_at_k.png`` and ``matches.png`` (:func:`retrieval_plots`),
    verification ``roc.png``, vehicleid ``cmc.png``. Raises ValueError for an unknown protocol or a missing file.
    """
    from pipeline.eval.retrieval import retrieval_metrics

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}' (choose {', '.join(PROTOCOLS)})")
    if protocol == "verification" and not pairs:
        raise ValueError("the verification protocol needs --pairs FILE (LFW pairs.txt format)")
    if protocol == "vehicleid" and not test_list:
        raise ValueError("the vehicleid protocol needs --test-list FILE (VehicleID test_list_*.txt format)")
    with_sources = protocol == "retrieval" and plot_dir is not None
    emb, labels, keys, *sources = _embed(cfg, state, data, with_sources=with_sources)
    out: dict[str, float] = {}
    if protocol == "retrieval":
        out = retrieval_metrics(emb, labels, ks=tuple(cfg.eval.ks), seed=cfg.train.seed)
        if with_sources:
            retrieval_plots(Path(plot_dir), out, emb, labels, keys, sources[0], seed=cfg.train.seed)
    elif protocol == "verification":
        from pipeline.data.pairs import read_lfw_pairs
        from pipeline.eval.verification import cosine_scores, verification_metrics

        plist = read_lfw_pairs(pairs)
        left = _rows_for([p.left.split("/")[-1] for p in plist], keys, pairs)
        right = _rows_for([p.right.split("/")[-1] for p in plist], keys, pairs)
        v = verification_metrics(cosine_scores(emb[left], emb[right]), np.array([p.is_same for p in plist]),
                                 np.array([p.fold for p in plist]))
        out = {"lfw_accuracy": v["accuracy"], "lfw_accuracy_std": v["accuracy_std"], "auc": v["auc"]}
        out.update({k: v[k] for k in v if k.startswith("tar@far=")})
        if plot_dir:
            _plot(Path(plot_dir) / "roc.png", np.maximum(v["roc_fpr"], 1e-5), v["roc_tpr"], "false accept rate",
                  "true accept rate", f"ROC (accuracy {v['accuracy']:.3f})", log_x=True)
    else:
        from pipeline.eval.vehicleid import read_test_list, vehicleid_protocol

        entries = read_test_list(test_list)
        rows = _rows_for([Path(name).stem for name, _ in entries], keys, test_list)
        v = vehicleid_protocol(emb[rows], np.array([vid for _, vid in entries]), repeats=10, seed=cfg.train.seed)
        out = {k: float(v[k]) for k in ("top1", "top1_std", "top5", "top5_std", "map", "map_std")}
        if plot_dir:
            cmc = v["cmc"]
            _plot(Path(plot_dir) / "cmc.png", np.arange(1, len(cmc) + 1), cmc, "rank", "match rate",
                  f"CMC ({Path(test_list).name}, top-1 {v['top1']:.3f})")
    out["num_eval_images"] = float(len(labels))
    out["num_eval_classes"] = float(len(np.unique(labels)))
    return out


def retrieval_plots(plot_dir: Path, metrics: dict, emb: np.ndarray, labels: np.ndarray, keys: np.ndarray,
                    sources: np.ndarray, seed: int = 0, queries: int = 16, k: int = 5) -> list[Path]:
    """``recall_at_k.png`` (Recall@K over K) and ``matches.png``: ``queries`` held-out images drawn
    with ``seed``, each beside its top-``k`` among the other evaluated images (same class framed
    green, another red; ``pipeline.eval.search``). Returns the paths."""
    from pipeline.eval.search import gallery_index, matches_picture, search

    ks = sorted(int(name.split("@")[1]) for name in metrics if name.startswith("recall@"))
    paths = [_plot(plot_dir / "recall_at_k.png", ks, [metrics[f"recall@{x}"] for x in ks], "K",
                   "Recall@K (held-out classes)", f"Recall@K ({len(np.unique(labels))} classes, {len(labels)} images)")]
    k = min(k, len(emb) - 1)
    pick = np.sort(np.random.default_rng(seed).choice(len(emb), size=min(queries, len(emb)), replace=False))
    scores, ids = search(gallery_index(emb, k=k + 1), emb[pick], k, keys[pick], keys)
    names = np.asarray([str(x) for x in labels], dtype=object)
    rows = [{"key": str(keys[i]), "label": names[i], "source": str(sources[i])} for i in pick]
    paths.append(matches_picture(plot_dir / "matches.png", rows, {"key": keys, "label": names, "source": sources},
                                 ids, scores))
    return paths


def log_plots(uri: str, run_id: str, protocol: str, evaluate, retry_s: float = 0.0) -> dict:
    """Run ``evaluate(plot_dir)`` (returns metrics) with a temporary plot folder and upload the
    plots it wrote to the run's ``eval/<protocol>/``; returns the metrics."""
    import tempfile

    from pipeline import tracking

    with tempfile.TemporaryDirectory() as plots:
        metrics = evaluate(plots)
        if os.listdir(plots):
            tracking.log_artifacts(uri, run_id, plots, f"eval/{protocol}", retry_s=retry_s)
    return metrics


def evaluate_run(run_id: str, data: str = "", tracking_uri: str = "", protocol: str = "retrieval",
                 pairs: str = "", test_list: str = "") -> dict:
    """Evaluate a finished run's checkpoint (from MLflow) and log metrics and plots to the same run.

    ``data`` defaults to the run's ``data.eval``. Returns ``{"run_id", "protocol", "metrics"}``.
    Raises LookupError for an unknown run and FileNotFoundError when it has no checkpoint.
    """
    import yaml

    from pipeline import tracking
    from pipeline.config import config_from_dict
    from pipeline.runtime import init_ray

    uri = tracking.resolve_uri(tracking_uri)
    run = tracking.get_run(uri, run_id)
    try:
        cfg = config_from_dict(yaml.safe_load(open(tracking.download_artifacts(uri, run_id, "config.yaml"))))
        ckpt = tracking.download_artifacts(uri, run_id, CHECKPOINT_ARTIFACT)
    except Exception as e:  # MLflow raises several types for a missing artifact
        raise FileNotFoundError(f"run '{run_id}' has no config.yaml or {CHECKPOINT_ARTIFACT} artifact: {e}") from None
    data = data or cfg.data.eval
    if not data:
        raise ValueError(f"run '{run_id}' has no data.eval; pass --data SHARDS")
    for f in (pairs, test_list):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"file '{f}' does not exist")
    init_ray(cfg.scaling.num_cpus)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    metrics = log_plots(uri, run_id, protocol, lambda d: evaluate_state(cfg, state, data, protocol, pairs, test_list, d))
    step = int(run.data.params.get("train.steps", 0))
    prefix = "" if protocol == "retrieval" else f"{protocol}/"
    tracking.log_metrics(uri, run_id, {prefix + k: v for k, v in metrics.items()}, step=step)
    return {"run_id": run_id, "protocol": protocol, "metrics": metrics}
