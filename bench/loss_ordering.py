"""Recall@1 on held-out classes for several losses at equal steps, several seeds (Sohn 2016's comparison).

    python bench/loss_ordering.py [--losses triplet_one triplet npair_ovo npair_mc npair_mc_mined]
        [--seeds 0 1 2] [--steps 300] [--mined-pool C] [-- key=value ...]

Runs ``jobs.train`` once per (loss, seed) on the quickstart data (made if missing) with
``configs/quickstart_<loss>.yaml`` (``configs/quickstart.yaml`` for npair_mc,
``configs/quickstart_mining.yaml`` for npair_mc_mined: N-pair-mc + Sohn's hard class mining
with ``miner.source=exemplars``, ``--mined-pool`` candidate classes, default the config's), tracks the
runs in ``bench/out/mlflow.db`` (experiment ``loss-ordering``), prints a table and a final
JSON line. Extra ``key=value`` overrides after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"npair_mc": "quickstart.yaml", "npair_mc_mined": "quickstart_mining.yaml"}


def quickstart_data() -> Path:
    """The quickstart shards (200 synthetic classes x 20 images, 64 px) under data/quickstart, made if missing."""
    data = ROOT / "data/quickstart"
    if not (data / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "jobs.make_shards", "--layout", "synthetic", "--num-classes", "200",
                        "--images-per-class", "20", "--image-size", "64", "--shard-size", "500", "--out", str(data)],
                       cwd=ROOT, check=True)
    return data


def run_job(cmd: list[str]) -> dict:
    """Run a ``jobs.train`` command line; return its final JSON line (exit with its stderr tail on failure)."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"run failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", nargs="+", default=["triplet_one", "triplet", "npair_ovo", "npair_mc"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--experiment", default="loss-ordering")
    p.add_argument("--mined-pool", type=int, default=0, help="miner.pool_classes of npair_mc_mined (0 = the config's)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    data = quickstart_data()
    out_dir = ROOT / "bench/out"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for loss in args.losses:
        cfg = ROOT / "configs" / CONFIGS.get(loss, f"quickstart_{loss}.yaml")
        # Sohn's mining re-embeds exemplars; the mining config's cheaper default source is ema.
        extra = (["miner.source=exemplars", *([f"miner.pool_classes={args.mined_pool}"] if args.mined_pool else [])]
                 if loss == "npair_mc_mined" else [])
        for seed in args.seeds:
            t0 = time.time()
            cmd = [sys.executable, "-m", "jobs.train", "--config", str(cfg), f"train.seed={seed}",
                   f"train.steps={args.steps}", f"tracking.uri=sqlite:///{out_dir / 'mlflow.db'}",
                   f"tracking.experiment={args.experiment}", f"train.storage_path={out_dir / 'runs'}",
                   f"data.train={data / 'train'}", f"data.eval={data / 'holdout'}", "eval.untrained=true",
                   *args.overrides, *extra]  # the untrained baseline for every loss (not every config asks for it)
            res = run_job(cmd)
            m = res["metrics"]
            row = {"seed": seed, "run_id": res["run_id"], "recall@1": m["recall@1"], "nmi": m["nmi"],
                   "untrained_recall@1": m["untrained_recall@1"], "wall_s": time.time() - t0,
                   # the evaluation during training at the best step (eval.max_images of data.eval)
                   "best_recall@1": m.get("best_recall@1"), "best_step": m.get("best_step")}
            results.setdefault(loss, []).append(row)
            print(f"{loss:>12} seed {seed}: R@1 {m['recall@1']:.4f} (untrained {m['untrained_recall@1']:.4f}) "
                  f"NMI {m['nmi']:.4f}  best during training {row['best_recall@1']} at step {row['best_step']}  "
                  f"{row['wall_s']:.0f}s", flush=True)
    summary = {}
    print(f"\n{'loss':>12} {'R@1 mean':>9} {'std':>7} {'NMI mean':>9}   per seed")
    for loss, rows in results.items():
        r1 = [r["recall@1"] for r in rows]
        summary[loss] = {"recall@1_mean": statistics.mean(r1), "recall@1_std": statistics.pstdev(r1),
                         "nmi_mean": statistics.mean(r["nmi"] for r in rows), "runs": rows}
        print(f"{loss:>12} {summary[loss]['recall@1_mean']:9.4f} {summary[loss]['recall@1_std']:7.4f} "
              f"{summary[loss]['nmi_mean']:9.4f}   {', '.join(f'{x:.3f}' for x in r1)}")
    (out_dir / f"loss_ordering_{'_'.join(args.losses)}_{'_'.join(map(str, args.seeds))}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"bench": "loss_ordering", "steps": args.steps, "seeds": args.seeds,
                      "recall@1": {k: round(v["recall@1_mean"], 4) for k, v in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
