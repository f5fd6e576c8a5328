"""Hard class mining vs random classes on the quickstart data, equal steps, several seeds (Sohn 2016, sec. 3.2.2).

    python bench/mining_effect.py [--seeds 0 1 2] [--steps 300] [--data DIR] [-- key=value ...]

Runs ``jobs.train`` with ``configs/quickstart_mining.yaml`` twice per seed, ``miner.enabled``
true and false, everything else equal; tracks the runs in ``bench/out/mlflow.db``
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--experiment", default="mining-effect")
    p.add_argument("--data", type=Path, default=None, help="shards dir (default: the quickstart data, made if missing)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    data = args.data.resolve() if args.data else quickstart_data()
    out_dir = ROOT / "bench/out"
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    rows = []
    for seed in args.seeds:
        for mining in (True, False):
            t0 = time.time()
            cmd = [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/quickstart_mining.yaml"),
                   f"miner.enabled={str(mining).lower()}", f"train.seed={seed}", f"train.steps={args.steps}",
                   f"tracking.uri={uri}", f"tracking.experiment={args.experiment}",
                   f"train.storage_path={out_dir / 'runs'}", f"data.train={data / 'train'}",
                   f"data.eval={data / 'holdout'}",
                   f"data.exemplars={data / 'exemplars'}", *args.overrides]
            res = run_job(cmd)
            row = {"seed": seed, "mining": mining, "run_id": res["run_id"], "recall@1": res["metrics"]["recall@1"],
                   "wall_s": time.time() - t0}
            if mining:
                row["hardness"] = side_by_side(uri, res["run_id"], args.steps // 3)
            rows.append(row)
            extra = ""
            if mining:
                h = row["hardness"]
                extra = "  " + "  ".join(f"{label} {h[k]['mined']:.3f}/{h[k]['random']:.3f} ({h[k]['ratio']:.2f})"
                                         for k, label in PAIRS)
            print(f"seed {seed} mining {'on ' if mining else 'off'}: R@1 {row['recall@1']:.4f}{extra}  "
                  f"{row['wall_s']:.0f}s", flush=True)
    on = [r for r in rows if r["mining"]]
    off = [r for r in rows if not r["mining"]]
    summary = {
        "recall@1_mining": statistics.mean(r["recall@1"] for r in on),
        "recall@1_random": statistics.mean(r["recall@1"] for r in off),
        **{f"{k}_ratio": statistics.mean(r["hardness"][k]["ratio"] for r in on) for k, _ in PAIRS},
        "hardest_neg_distance_ratio": statistics.mean(r["hardness"]["hardest_neg_sim_mean"]["distance_ratio"]
                                                      for r in on),
    }
    print(f"\nmean R@1 mining {summary['recall@1_mining']:.4f} vs random {summary['recall@1_random']:.4f}; "
          + ", ".join(f"{label} ratio {summary[f'{k}_ratio']:.2f}" for k, label in PAIRS))
    (out_dir / "mining_effect.json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=1))
    print(json.dumps({"bench": "mining_effect", "data": str(data), "steps": args.steps, "seeds": args.seeds,
                      "overrides": args.overrides, **{k: round(v, 4) for k, v in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
