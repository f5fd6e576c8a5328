"""Scaling of Sohn's greedy class selection and of the class-index build (pipeline.mining).

    python bench/bench_mining.py [--classes 10000 100000 1000000] [--max-classes 100000] [--threads 1]

For each C (synthetic standard-normal float32 vectors, d=512 by default):

* build: ``ClassEmbeddingIndex.update`` on C classes -- input checks, L2
  normalisation, a new FAISS index (flat by default) and the atomic swap.
* select: ``index.select(pool, N, rng)`` with the pool = all C classes in a
  shuffled order (so the (C, d) candidate sub-matrix is gathered, as for a real
  pool), N = 64 and 192.
* limit: the unavoidable work of the greedy step, N matrix-vector products
  (C x d) @ (d,) into a preallocated buffer in a tight numpy loop, on the
  already-gathered sub-matrix. ``select / limit`` near 1 means the selection
  adds little beyond the products (gather, running max, tie search); the
  gather column is the one-off copy of the pool's rows included in select.

select and limit take turns within each repetition so machine load hits both
alike; medians are reported. 1M x 512 float32 is 2 GB per copy and the bench
holds up to four (input, normalised, FAISS, gathered): ~8 GB peak.
Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from pipeline.mining.class_index import ClassEmbeddingIndex


def matvec_limit(sub: np.ndarray, n: int) -> float:
    """Seconds for n products (C x d) @ (d,) into one buffer: the greedy step's floor."""
    out = np.empty(sub.shape[0], dtype=np.float32)
    start = time.perf_counter()
    for i in range(n):
        np.matmul(sub, sub[i], out=out)
    return time.perf_counter() - start


def bench_one(num: int, dim: int, ns: list[int], index_kind: str, reps: int, seed: int) -> dict:
    """Build, select and limit timings for one class count; returns a result row."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((num, dim), dtype=np.float32)
    ids = np.arange(num, dtype=np.int64)
    index = ClassEmbeddingIndex(dim, index=index_kind)
    start = time.perf_counter()
    index.update(ids, emb)
    build_s = time.perf_counter() - start
    del emb

    pool = rng.permutation(num)
    snap = index.snapshot()
    start = time.perf_counter()
    sub = snap.embeddings[snap.rows_of(pool)]  # what select gathers first: part of its overhead
    gather_s = time.perf_counter() - start
    row = {"classes": num, "dim": dim, "index": index_kind, "build_s": build_s, "gather_s": gather_s}
    for n in ns:
        index.select(pool, n, np.random.default_rng(0))  # warm-up (page faults, BLAS)
        select_t, limit_t = [], []
        for rep in range(reps):
            start = time.perf_counter()
            picked = index.select(pool, n, np.random.default_rng(rep))
            select_t.append(time.perf_counter() - start)
            limit_t.append(matvec_limit(sub, n))
            assert len(set(picked)) == n
        sel, lim = statistics.median(select_t), statistics.median(limit_t)
        row[f"select_N{n}_s"] = sel
        row[f"limit_N{n}_s"] = lim
        row[f"ratio_N{n}"] = sel / lim
    return row


def main() -> None:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--max-classes", type=int, default=None, help="skip class counts above this")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n", type=int, nargs="+", default=[64, 192], help="classes per selection")
    parser.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (1 for >= 1M classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="cap BLAS/OpenMP threads (1 gives steadier figures on a busy machine)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        threadpool_limits(args.threads)

    threads = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
    print(f"BLAS/OpenMP threads: {threads}; load average at start: {os.getloadavg()[0]:.1f}")
    head = f"{'C':>9} {'build s':>8} {'gather':>7}"
    for n in args.n:
        head += f" {'sel N=' + str(n):>10} {'limit':>8} {'ratio':>6}"
    print(head)
    rows = []
    for num in args.classes:
        if args.max_classes is not None and num > args.max_classes:
            continue
        reps = 1 if num >= 1_000_000 else args.reps
        row = bench_one(num, args.dim, args.n, args.index, reps, args.seed)
        rows.append(row)
        line = f"{num:>9} {row['build_s']:>8.3f} {row['gather_s']:>7.3f}"
        for n in args.n:
            line += f" {row[f'select_N{n}_s']:>10.3f} {row[f'limit_N{n}_s']:>8.3f} {row[f'ratio_N{n}']:>6.2f}"
        print(line, flush=True)
    print(json.dumps({"bench": "mining", "threads": threads, "loadavg_1m": os.getloadavg()[0], "results": rows}))


if __name__ == "__main__":
    main()
