"""Hard class mining vs random classes on the quickstart data, equal steps, several seeds (Sohn 2016, sec. 3.2.2).

    python bench/mining_effect.py [--seeds 0 1 2] [--steps 1000] [--at 300 1000] [--arms random mined knn ema]
                                  [--data DIR] [--out FILE] [-- key=value ...]

Runs ``jobs.train`` with ``configs/quickstart_mining.yaml`` once per seed and arm (``random``:
``miner.enabled`` false; ``mined``, ``knn``, ``ema``: mining with that candidate set / class
embedding source, see ``ARMS``), everything else equal; ``--at`` also reads each run's held-out
Recall@1 at those steps (evaluated during training, ``eval.every``), so one 1000-step run gives
the 300- and 1000-step figures (the learning rate is constant: a run's step 300 is a 300-step run); tracks the runs in ``bench/out/mlflow.db``
(experiment ``mining-effect``). For each run it reports held-out Recall@1 and, for the
mining runs, how hard the trained batches were against the random batches drawn side by
side from the same pool at the same moment (``mine/*`` vs ``mine/random_*`` at the steps
that have both; the last two thirds of the run, once the embeddings have some structure):
hardest-negative cosine and margin-violation fraction, and their ratios mined / random.
``--data`` trains on other shards made by ``jobs.make_shards`` (``DIR/train``,
``DIR/holdout``, ``DIR/exemplars``), e.g. many classes, where random batches rarely hold
look-alikes. Prints a table and a final JSON line. Extra ``key=value`` overrides after ``--`` go to
every run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loss_ordering import quickstart_data, run_job  # noqa: E402

PAIRS = (("hardest_neg_sim_mean", "hardest-neg cosine"), ("violation_frac", "violation frac"))


def side_by_side(uri: str, run_id: str, from_step: int) -> dict:
    """Means of ``mine/<k>`` and ``mine/random_<k>`` over the steps >= ``from_step`` that logged both."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    out = {}
    for key, _ in PAIRS:
        mined = {m.step: m.value for m in client.get_metric_history(run_id, f"mine/{key}")}
        rand = {m.step: m.value for m in client.get_metric_history(run_id, f"mine/random_{key}")}
        steps = sorted(s for s in rand if s in mined and s >= from_step)
        if not steps:
            raise SystemExit(f"run {run_id}: no step >= {from_step} logged both mine/{key} and mine/random_{key}")
        m, r = statistics.mean(mined[s] for s in steps), statistics.mean(rand[s] for s in steps)
        out[key] = {"mined": m, "random": r, "ratio": m / r if r else float("nan"), "steps": len(steps),
                    "mined_higher_frac": sum(mined[s] > rand[s] for s in steps) / len(steps)}
        if key == "hardest_neg_sim_mean":
            # Cosines of look-alike negatives crowd near 1, where a ratio of similarities says
            # little; the cosine distance (1 - cos) to the hardest negative shows the gap.
            out[key]["distance_ratio"] = (1 - m) / (1 - r) if r < 1 else float("nan")
    return out


ARMS = {
    "random": ["miner.enabled=false"],
    "mined": ["miner.enabled=true", "miner.source=exemplars"],
    "knn": ["miner.enabled=true", "miner.source=exemplars", "miner.candidates=knn"],
    "ema": ["miner.enabled=true", "miner.source=ema"],
    "knn_ema": ["miner.enabled=true", "miner.candidates=knn", "miner.source=ema"],
    "trainers": ["miner.enabled=true", "miner.source=exemplars", "miner.refresh_by=trainers"],
}
"""The runs compared per seed: ``random`` batches, and mining with Sohn's random candidate set
(``mined``: exemplars embedded by the refresher actor's Ray Data tasks, as ``refresh_by: auto``
does on CPUs), FAISS nearest neighbours of a seed class (``knn``), EMA class embeddings
(``ema``, the mining config's source), exemplars embedded by the training workers (``trainers``, as on a
full GPU cluster). Each arm names its source: the config's own does not decide what an arm measures."""


def recall_at(uri: str, run_id: str, metric: str, steps: list[int]) -> dict[int, float]:
    """``metric``'s in-training values at ``steps`` (logged by ``eval.every``); raises when one is missing.

    The last step has two: the evaluation during training (on up to ``eval.max_images``
    held-out images, like every other step's) and, logged after it, the end-of-run
    evaluation on all of ``data.eval``; the first is taken, so that every step is measured
    on the same images."""
    from mlflow.tracking import MlflowClient

    hist: dict[int, float] = {}
    for m in sorted(MlflowClient(tracking_uri=uri).get_metric_history(run_id, metric), key=lambda m: m.timestamp):
        hist.setdefault(m.step, m.value)
    missing = [s for s in steps if s not in hist]
    if missing:
        raise SystemExit(f"run {run_id}: {metric} was not logged at steps {missing} (logged: {sorted(hist)})")
    return {s: hist[s] for s in steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--at", nargs="+", type=int, default=None,
                   help="also report held-out Recall@1 at these steps of each run (evaluated during training "
                        "on up to --eval-images held-out images; default: only the end of the run)")
    p.add_argument("--eval-images", type=int, default=100_000, help="eval.max_images for --at")
    p.add_argument("--arms", nargs="+", default=["random", "mined"], choices=sorted(ARMS))
    p.add_argument("--experiment", default="mining-effect")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default bench/out/mining_effect.json)")
    p.add_argument("--data", type=Path, default=None, help="shards dir (default: the quickstart data, made if missing)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    data = args.data.resolve() if args.data else quickstart_data()
    out_dir = ROOT / "bench/out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out or out_dir / "mining_effect.json"
    uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    at = sorted(set(args.at or []))
    evals = []
    if at:
        every = math.gcd(*at, args.steps)
        evals = [f"eval.every={every}", f"eval.max_images={args.eval_images}", "eval.untrained=false"]
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            mining = arm != "random"
            t0 = time.time()
            cmd = [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/quickstart_mining.yaml"),
                   *ARMS[arm], "miner.hardness_every=10",  # hardness samples every 10 steps (default 50)
                   f"train.seed={seed}", f"train.steps={args.steps}",
                   f"tracking.uri={uri}", f"tracking.experiment={args.experiment}",
                   f"train.storage_path={out_dir / 'runs'}", f"data.train={data / 'train'}",
                   f"data.eval={data / 'holdout'}",
                   f"data.exemplars={data / 'exemplars'}", *evals, *args.overrides]
            res = run_job(cmd)
            m = res["metrics"]
            row = {"seed": seed, "arm": arm, "mining": mining, "run_id": res["run_id"], "recall@1": m["recall@1"],
                   "best_step": m.get("best_step"), "train_time_s": m.get("train_time_s"),
                   "wall_s": time.time() - t0}
            if at:
                row["recall@1_at"] = recall_at(uri, res["run_id"], "recall_at_1", at)
            if mining:
                # The last two thirds of the run, and only the mined steps (miner.warmup_steps).
                warm = max([int(o.split("=", 1)[1]) for o in args.overrides if o.startswith("miner.warmup_steps=")],
                           default=0)
                row["hardness"] = side_by_side(uri, res["run_id"], max(args.steps // 3, warm + 1))
            rows.append(row)
            extra = ""
            if at:
                extra += "  " + " ".join(f"@{s} {v:.4f}" for s, v in row["recall@1_at"].items())
            if mining:
                h = row["hardness"]
                extra += "  " + "  ".join(f"{label} {h[k]['mined']:.3f}/{h[k]['random']:.3f} ({h[k]['ratio']:.2f})"
                                          for k, label in PAIRS)
            print(f"seed {seed} {arm:8s}: R@1 {row['recall@1']:.4f}{extra}  train {row['train_time_s']}s "
                  f"wall {row['wall_s']:.0f}s", flush=True)
            out_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows},
                                           indent=1))
    summary = {}
    for arm in args.arms:
        runs = [r for r in rows if r["arm"] == arm]
        summary[f"recall@1_{arm}"] = statistics.mean(r["recall@1"] for r in runs)
        for s in at:
            summary[f"recall@1_{arm}@{s}"] = statistics.mean(r["recall@1_at"][s] for r in runs)
        if arm != "random":
            summary.update({f"{arm}_{k}_ratio": statistics.mean(r["hardness"][k]["ratio"] for r in runs)
                            for k, _ in PAIRS})
    print("\n" + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    out_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                    "runs": rows}, indent=1))
    print(json.dumps({"bench": "mining_effect", "data": str(data), "steps": args.steps, "seeds": args.seeds,
                      "arms": args.arms, "overrides": args.overrides,
                      **{k: round(v, 4) for k, v in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
