"""Batch planner cost per global step, and its state size, against the number of classes.

    python bench/bench_planner.py [--classes 10000 100000 1000000] [--steps 2000] [--sampling uniform proportional]

For each C: a synthetic manifest of C classes with CASIA-WebFace-like sizes (seeded
lognormal, clipped to 2..800, mean ~47; only the counts exist, no data), N = 192 classes x
M = 2 images per step, W = 8 ranks, ``max_lead`` = 8. A step is what the planner actor
does for it: ``plan(step)``, the 8 ranks' ``slice`` and ``take``. Reported per step over
``--steps`` steps after 50 warm-up steps (at 10k classes that crosses a pass end, whose
O(C) restart is in the figures): the mean, the best mean of 4 equal blocks of steps (what
the planner costs when other processes leave the cores alone; on a shared 2-core machine
the plain mean swings 2-5x from run to run), and the 99th percentile; the time to build the
planner, ``state_dict`` time and its size in bytes (arrays' ``nbytes`` plus 8 per int).
One line also times the alternative the planner's docstring rejects: a seeded NumPy
permutation per class (192 of them per step). Goal: <= 2 ms per step in random mode.
Prints a markdown table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.data.planner import BatchPlanner

N, M, W, LEAD = 192, 2, 8, 8


def manifest(num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, starts and counts of ``num_classes`` CASIA-like classes (mean ~47 samples)."""
    rng = np.random.default_rng(seed)
    counts = np.clip(np.round(rng.lognormal(3.36, 1.0, num_classes)), 2, 800).astype(np.int64)
    return np.arange(num_classes), np.concatenate([[0], np.cumsum(counts)[:-1]]), counts


def state_bytes(state: dict) -> int:
    """Bytes of a planner state: array payloads plus 8 per Python int."""
    return sum(v.nbytes if isinstance(v, np.ndarray) else 8 for v in state.values())


def bench_one(num_classes: int, sampling: str, steps: int) -> dict:
    """Figures for one C and sampling mode."""
    ids, starts, counts = manifest(num_classes)
    t0 = time.perf_counter()
    planner = BatchPlanner(ids, starts, counts, classes_per_batch=N, images_per_class=M, world_size=W,
                           seed=0, sampling=sampling, max_lead=LEAD)
    build = time.perf_counter() - t0
    per_step = []
    for step in range(50 + steps):
        t = time.perf_counter()
        planner.plan(step)
        for rank in range(W):
            planner.slice(step, rank)
            planner.take(step, rank)
        per_step.append(time.perf_counter() - t)
    per_step = np.array(per_step[50:])
    best_block = min(float(b.mean()) for b in np.array_split(per_step, 4))
    t = time.perf_counter()
    state = planner.state_dict(planner.next_step)
    state_s = time.perf_counter() - t
    return {
        "classes": num_classes, "samples": int(counts.sum()), "sampling": sampling,
        "step_ms_mean": 1e3 * float(per_step.mean()), "step_ms_best_block": 1e3 * best_block,
        "step_ms_p99": 1e3 * float(np.percentile(per_step, 99)),
        "build_s": build, "state_dict_ms": 1e3 * state_s, "state_bytes": state_bytes(state),
        "passes_ended": len(planner.unused),
    }


def per_class_permutation_ms(reps: int = 20) -> float:
    """Milliseconds for 192 seeded NumPy permutations of CASIA-sized classes (the rejected design)."""
    _, _, counts = manifest(N, seed=1)
    t = time.perf_counter()
    for r in range(reps):
        for c, n in enumerate(counts):
            np.random.Generator(np.random.PCG64((0, r, c))).permutation(int(n))
    return 1e3 * (time.perf_counter() - t) / reps


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sampling", nargs="+", default=["uniform", "proportional"],
                        choices=["uniform", "proportional"])
    args = parser.parse_args()
    print("command: python bench/bench_planner.py " + " ".join(sys.argv[1:]))
    print(f"N={N} M={M} W={W} max_lead={LEAD}; load average at start: {os.getloadavg()[0]:.1f}\n")
    print("| classes | samples | sampling | ms/step mean | best block | p99 | build s | state_dict ms | state bytes |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for num in args.classes:
        for sampling in args.sampling:
            row = bench_one(num, sampling, args.steps)
            rows.append(row)
            print(f"| {num:,} | {row['samples']:,} | {sampling} | {row['step_ms_mean']:.3f} | {row['step_ms_best_block']:.3f} | "
                  f"{row['step_ms_p99']:.3f} | {row['build_s']:.3f} | {row['state_dict_ms']:.2f} | "
                  f"{row['state_bytes']:,} |", flush=True)
    perm = per_class_permutation_ms()
    print(f"\nrejected design, a seeded NumPy permutation per drawn class: {perm:.2f} ms per step of {N} classes")
    print(json.dumps({"bench": "planner", "loadavg_1m": os.getloadavg()[0], "permutation_per_class_ms": perm,
                      "results": rows}))


if __name__ == "__main__":
    main()
