"""What hard class mining costs in wall time and CPU, against random batches run beside it.

    python bench/mining_cost.py [--reps 3] [--steps 600] [--n 32] [--arms random ema ema_miner mined]
                                [--data DIR] [--out FILE] [-- key=value ...]

Runs ``jobs.train`` (``configs/quickstart_mining.yaml`` at N = ``--n``, ``miner.warmup_steps``
128, no held-out evaluation: ``data.eval`` empty) once per arm and repetition, the arms
interleaved within each repetition so that a burst of outside load hits them alike. The limit
each mining arm is compared with is the ``random`` arm of the same repetition (``miner.enabled``
false, everything else equal). Per run it reads:

* ``train_time_s`` (the final JSON line) and the median of ``train/images_per_s`` over the log
  steps from ``--from-step`` on (MLflow; past the warm-up, robust to a burst of load); for the
  mining arms, the median ``mine/select_ms`` (the planner's time per step selection) after the warm-up;
* CPU seconds per role, from ``/proc`` sampled every second while the job runs (Linux): each
  process's CPU time since the last sample goes to the role its title names at that sample
  (Ray workers change titles as they take tasks): ``trainers`` (``RayTrainWorker``), ``stream``
  (the Ray Data read/fetch/decode tasks), ``planner``, ``miner``, ``refresher`` (exemplar
  embedding), ``driver`` (``jobs.train``), ``ray`` (raylet, GCS, dashboard, Ray's own actors),
  for the job's processes (descendants of the ``jobs.train`` process: it starts its local
  Ray); ``other`` is every other process of the machine (outside load). A process's CPU after
  its last sample (<= 1 s of it) is not seen.

Arms (``ARMS``): ``random``; ``ema`` (``miner.source: ema``, the greedy step in the planner on a
copy of the class table, ``miner.select_at: planner``); ``ema_miner`` (the same, selected by the
miner actor at every step, as before ``select_at``); ``mined`` (exemplars embedded by the
refresher actor, selection in the planner); ``mined_miner``; ``trainers`` (exemplars embedded by
the training workers, ``miner.refresh_by: trainers``: no Ray Data pipeline per refresh). Prints
one line per run, a table of ratios to random per repetition, and a final JSON line; writes
``--out`` after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loss_ordering import quickstart_data  # noqa: E402

ARMS = {
    "random": ["miner.enabled=false"],
    "ema": ["miner.enabled=true", "miner.source=ema", "miner.select_at=planner"],
    "ema_miner": ["miner.enabled=true", "miner.source=ema", "miner.select_at=miner"],
    "mined": ["miner.enabled=true", "miner.source=exemplars", "miner.select_at=planner"],
    "mined_miner": ["miner.enabled=true", "miner.source=exemplars", "miner.select_at=miner"],
    "trainers": ["miner.enabled=true", "miner.source=exemplars", "miner.refresh_by=trainers",
                 "miner.select_at=planner"],
}

ROLES = ("trainers", "stream", "planner", "miner", "refresher", "driver", "ray", "other")


def role_of(title: str) -> str:
    """The role of a process from its command line (a Ray worker's is its task or actor title)."""
    if "RayTrainWorker" in title:
        return "trainers"
    if "PlannerActor" in title:
        return "planner"
    if "MinerActor" in title:
        return "miner"
    if "Refresher" in title or "Embedder" in title:
        return "refresher"
    if any(k in title for k in ("FetchDecode", "ReadRange", "ReadWebDataset", "SplitBlocks", "MapWorker",
                                "StreamSplit", "SplitCoordinator")):
        return "stream"
    if "jobs.train" in title:
        return "driver"
    if title.startswith("ray::") or any(k in title for k in ("raylet", "gcs_server", "/ray/", "ray/dashboard")):
        return "ray"
    return "other"


class CpuByRole:
    """Samples /proc every ``every_s`` seconds in a thread; ``seconds`` holds the CPU time per role so far."""

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self.root: int | None = None
        """The job's pid: its descendants are charged by role, the rest of the machine to ``other``."""
        self.seconds = dict.fromkeys(ROLES, 0.0)
        self._last: dict[int, float] = {}
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._me = os.getpid()

    def __enter__(self):
        self.sample()  # the baseline: CPU before the job is nobody's
        self.seconds = dict.fromkeys(ROLES, 0.0)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        procs = {}
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == self._me:
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # gone since listdir
            procs[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick, title)
        now = {}
        for pid, (_, cpu, title) in procs.items():
            now[pid] = cpu
            # A process born since the last sample: all its CPU is new (none at the baseline sample).
            new = cpu - self._last.get(pid, cpu if not self._last else 0.0)
            self.seconds[role_of(title) if self._in_job(pid, procs) else "other"] += max(0.0, new)
        self._last = now

    def _in_job(self, pid: int, procs: dict) -> bool:
        """Whether ``pid`` descends from :attr:`root` (any process when no root is set)."""
        if self.root is None:
            return True
        for _ in range(64):
            if pid == self.root:
                return True
            if pid not in procs:
                return False
            pid = procs[pid][0]
        return False


def median_metric(uri: str, run_id: str, key: str, from_step: int) -> float:
    """Median of metric ``key`` over its steps >= ``from_step``; raises SystemExit when there is none."""
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    vals = [m.value for m in hist if m.step >= from_step]
    if not vals:
        raise SystemExit(f"run {run_id}: no {key} at step >= {from_step}")
    return statistics.median(vals)


def ratios(rows: list[dict]) -> dict:
    """Per mining arm: the mean over repetitions of (arm / random of the same repetition) for train
    time, median throughput and CPU per role, and the per-repetition train-time ratios."""
    out = {}
    by_rep = {}
    for r in rows:
        by_rep.setdefault(r["rep"], {})[r["arm"]] = r
    for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] != "random"):
        pairs = [(reps[arm], reps["random"]) for reps in by_rep.values() if arm in reps and "random" in reps]
        if not pairs:
            continue
        t = [a["train_time_s"] / b["train_time_s"] for a, b in pairs]
        thr = [a["median_images_per_s"] / b["median_images_per_s"] for a, b in pairs]
        cpu = [sum(a["cpu_s"].values()) / sum(b["cpu_s"].values()) for a, b in pairs]
        out[arm] = {"train_time_ratio": statistics.mean(t), "train_time_ratios": t,
                    "throughput_ratio": statistics.mean(thr), "cpu_ratio": statistics.mean(cpu),
                    "extra_cpu_s": {k: statistics.mean(a["cpu_s"][k] - b["cpu_s"][k] for a, b in pairs)
                                    for k in ROLES}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--n", type=int, default=32, help="classes per global batch")
    p.add_argument("--from-step", type=int, default=200, help="median throughput from this log step on")
    p.add_argument("--arms", nargs="+", default=["random", "ema", "ema_miner", "mined"], choices=sorted(ARMS))
    p.add_argument("--data", type=Path, default=None, help="shards dir (default: the quickstart data, made if missing)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default bench/out/mining_cost.json)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if "random" not in args.arms:
        p.error("--arms needs 'random': it is the limit every mining arm is compared with")
    data = args.data.resolve() if args.data else quickstart_data()
    out_dir = ROOT / "bench/out"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out or out_dir / "mining_cost.json"
    uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    rows = []
    for rep in range(args.reps):
        for arm in args.arms:
            cmd = [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/quickstart_mining.yaml"),
                   *ARMS[arm], f"batch.classes_per_batch={args.n}", f"miner.pool_classes={4 * args.n}",
                   "miner.warmup_steps=128", f"train.steps={args.steps}", "train.log_every=25", "train.seed=0",
                   f"data.train={data / 'train'}", f"data.exemplars={data / 'exemplars'}", "data.eval=",
                   f"tracking.uri={uri}", "tracking.experiment=mining-cost", f"train.storage_path={out_dir / 'runs'}",
                   *args.overrides]
            t0 = time.time()
            with CpuByRole() as cpu:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                cpu.root = proc.pid
                stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                print(stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run failed: {' '.join(cmd)}")
            res = json.loads(stdout.strip().splitlines()[-1])
            row = {"rep": rep, "arm": arm, "run_id": res["run_id"], "train_time_s": res["metrics"]["train_time_s"],
                   "median_images_per_s": median_metric(uri, res["run_id"], "train/images_per_s", args.from_step),
                   "wall_s": time.time() - t0, "cpu_s": {k: round(v, 2) for k, v in cpu.seconds.items()}}
            if arm != "random":  # the planner's time per selection, past the warm-up
                row["median_select_ms"] = median_metric(uri, res["run_id"], "mine/select_ms", 129)
            rows.append(row)
            sel = f", select {row['median_select_ms']:.2f} ms" if "median_select_ms" in row else ""
            print(f"rep {rep} {arm:11s}: train {row['train_time_s']:.1f}s, median {row['median_images_per_s']:.0f} "
                  f"img/s{sel}, CPU " + " ".join(f"{k} {v:.1f}" for k, v in row["cpu_s"].items()), flush=True)
            out_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows},
                                           indent=1))
    summary = ratios(rows)
    for arm, s in summary.items():
        extra = ", ".join(f"{k} {v:+.1f}" for k, v in s["extra_cpu_s"].items() if abs(v) >= 0.5)
        print(f"{arm:11s}: train time x{s['train_time_ratio']:.3f} (per rep "
              f"{', '.join(f'{x:.3f}' for x in s['train_time_ratios'])}), throughput x{s['throughput_ratio']:.3f}, "
              f"CPU x{s['cpu_ratio']:.3f}; extra CPU s: {extra}")
    out_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                    "runs": rows}, indent=1))
    print(json.dumps({"bench": "mining_cost", "data": str(data), "steps": args.steps, "n": args.n, "reps": args.reps,
                      **{f"{arm}_train_time_ratio": round(s["train_time_ratio"], 4) for arm, s in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
