"""Compare MLflow runs: a table of the params that differ and the final metrics, plus plots.

Plots: training-loss curves overlaid, Recall@K per run, mining metrics over steps (when the
runs have them). Everything is written to a directory and logged as artifacts of a new
comparison run (tag ``dml.kind=comparison``) in the first run's experiment.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from pipeline import tracking

SUMMARY_METRICS = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "nmi", "f1", "map_at_r",
                   "untrained_recall_at_1", "train_loss", "train_time_s")
"""Final metrics shown in the table (those present in at least one run), in this order."""
IGNORED_PARAMS = ("tracking.uri", "train.run_name", "train.storage_path")
"""Params that differ between runs without saying anything about the method."""
KIND_TAG = "dml.kind"


def find_runs(uri: str, experiment: str = "", run_ids: list[str] | None = None, filter_string: str = "") -> list:
    """The runs to compare: ``run_ids`` if given, else the runs of ``experiment`` matching ``filter_string``.

    Comparison runs are never included. Returns runs oldest first. Raises LookupError when an
    experiment or run does not exist, and ValueError for a bad filter or fewer than 1 run.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if run_ids:
        runs = [tracking.get_run(uri, r) for r in run_ids]
    else:
        exp = client.get_experiment_by_name(experiment or "dml")
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise LookupError(f"MLflow experiment '{experiment or 'dml'}' not found in '{uri}' (have: {names})")
        try:
            runs = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)
        except MlflowException as e:
            raise ValueError(f"bad --filter '{filter_string}': {e.message}") from None
    runs = [r for r in runs if r.data.tags.get(KIND_TAG) != "comparison"]
    if not runs:
        raise ValueError("no runs to compare (check --experiment / --filter / --runs)")
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def comparison_table(runs: list) -> tuple[list[str], list[list]]:
    """Columns and rows: run id, name, the params whose values differ, then the final metrics."""
    keys = sorted({k for r in runs for k in r.data.params} - set(IGNORED_PARAMS))
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    metrics = [m for m in SUMMARY_METRICS if any(m in r.data.metrics for r in runs)]
    cols = ["run_id", "run_name", *differing, *metrics]
    rows = []
    for r in runs:
        rows.append([r.info.run_id, r.info.run_name or "", *[r.data.params.get(k, "") for k in differing],
                     *[r.data.metrics.get(m, float("nan")) for m in metrics]])
    return cols, rows


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def to_markdown(cols: list[str], rows: list[list]) -> str:
    """The table as GitHub Markdown."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(cols: list[str], rows: list[list]) -> str:
    """The table as CSV (full float precision)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    w.writerows(rows)
    return buf.getvalue()


def _label(run) -> str:
    return f"{run.info.run_name or run.info.run_id[:8]} ({run.data.params.get('loss.name', '?')})"


def _history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    h = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return np.array([m.step for m in h]), np.array([m.value for m in h])


def make_plots(uri: str, runs: list, out: Path) -> list[Path]:
    """Write loss_curves.png, recall_at_k.png and (if any run has mining metrics) mining.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in runs:
        steps, vals = _history(client, r.info.run_id, "train/loss")
        if len(vals):
            w = max(1, len(vals) // 20)  # moving average: per-step N-pair losses are noisy
            smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1 :], smooth, label=_label(r))
    ax.set(xlabel="step", ylabel="training loss (moving average)", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")
    plt.close(fig)
    paths.append(out / "loss_curves.png")

    ks = sorted({int(k.split("_")[-1]) for r in runs for k in r.data.metrics
                 if k.startswith("recall_at_") and k.split("_")[-1].isdigit()})
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        vals = [r.data.metrics.get(f"recall_at_{k}", np.nan) for k in ks]
        ax.bar(np.arange(len(ks)) + i * width, vals, width, label=_label(r))
    ax.set_xticks(np.arange(len(ks)) + width * (len(runs) - 1) / 2, [f"R@{k}" for k in ks])
    ax.set(ylabel="Recall@K (held-out classes)", ylim=(0, 1), title="Recall@K per run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "recall_at_k.png")
    plt.close(fig)
    paths.append(out / "recall_at_k.png")

    mine_keys = sorted({k for r in runs for k in r.data.metrics if k.startswith("mine/")})
    if mine_keys:
        fig, axes = plt.subplots(len(mine_keys), 1, figsize=(7, max(3.5, 2.2 * len(mine_keys))), dpi=100, squeeze=False)
        for ax, key in zip(axes[:, 0], mine_keys):
            for r in runs:
                steps, vals = _history(client, r.info.run_id, key)
                if len(vals):
                    ax.plot(steps, vals, label=_label(r))
            ax.set(ylabel=key.split("/", 1)[1], xlabel="step")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=7)
        axes[0, 0].set_title("Mining metrics")
        fig.tight_layout()
        fig.savefig(out / "mining.png")
        plt.close(fig)
        paths.append(out / "mining.png")
    return paths


def compare_runs(uri: str, out: str | Path, experiment: str = "", run_ids: list[str] | None = None,
                 filter_string: str = "") -> dict:
    """Build the table and plots into ``out`` and log them to a new comparison run.

    Returns ``{"comparison_run_id", "runs", "columns", "rows", "files"}``.
    """
    from mlflow.tracking import MlflowClient

    runs = find_runs(uri, experiment, run_ids, filter_string)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols, rows = comparison_table(runs)
    (out / "comparison.md").write_text(to_markdown(cols, rows))
    (out / "comparison.csv").write_text(to_csv(cols, rows))
    files = [out / "comparison.md", out / "comparison.csv", *make_plots(uri, runs, out)]
    client = MlflowClient(tracking_uri=uri)
    cmp_run = client.create_run(runs[0].info.experiment_id, run_name=f"compare-{len(runs)}-runs",
                                tags={KIND_TAG: "comparison", "dml.compared_runs": ",".join(r.info.run_id for r in runs)})
    for f in files:
        client.log_artifact(cmp_run.info.run_id, str(f), "comparison")
    client.set_terminated(cmp_run.info.run_id, "FINISHED")
    return {"comparison_run_id": cmp_run.info.run_id, "runs": [r.info.run_id for r in runs], "columns": cols,
            "rows": rows, "files": [str(f) for f in files]}
