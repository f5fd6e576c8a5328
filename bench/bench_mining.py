"""Scaling of Sohn's greedy class selection and of the class-index build (pipeline.mining).

    python bench/bench_mining.py [--classes 10000 100000 1000000] [--max-classes 100000] [--threads 1]
    python bench/bench_mining.py --knn [--index flat ivf hnsw] [--pool 64] [--n 16] [--dim 128] [--threads 1]

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

``--knn``: the planner's selection per step with ``miner.candidates: knn``, the selector's
own code (``MinedSelector``) over an in-process index (no actor round trips; those are
measured once, ``rtt``, on a real MinerActor, and do not depend on C): a random seed
among the 90% active classes, its ``pool - 1`` nearest active classes by FAISS (over-fetched,
filtered), Sohn's greedy from the seed. Columns: build (``update``), knn search alone,
the whole selection, and the recall of the pool against an exact search. Clustered
synthetic vectors (C / 20 centres), so neighbourhoods exist.

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
from pipeline.mining.selector import MinedSelector


class InProcessMiner:
    """The ``MinerClient`` interface over a ``ClassEmbeddingIndex`` in this process (what the actor runs)."""

    def __init__(self, index: ClassEmbeddingIndex):
        self.index, self.last_version, self.fallbacks = index, index.version, 0
        self.search_s = 0.0

    def neighbours(self, class_id: int, k: int) -> np.ndarray:
        start = time.perf_counter()
        out = self.index.neighbours(class_id, k)
        self.search_s += time.perf_counter() - start
        return out

    def select(self, candidates, n, rng, first=None, filled=0) -> list[int]:
        return self.index.select(candidates, n, np.random.default_rng(int(rng.integers(2**63 - 1))), first=first)


def bench_knn(num: int, dim: int, kind: str, pool: int, n: int, reps: int, seed: int) -> dict:
    """Build and per-step knn selection timings for one class count and index kind; returns a result row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, num // 20), dim), dtype=np.float32)
    emb = centres[rng.integers(len(centres), size=num)] + 0.5 * rng.standard_normal((num, dim), dtype=np.float32)
    index = ClassEmbeddingIndex(dim, index=kind)
    start = time.perf_counter()
    index.update(np.arange(num), emb)
    build_s = time.perf_counter() - start
    unit = index.snapshot().embeddings
    remaining = np.where(rng.random(num) < 0.9, 10, 0).astype(np.int32)
    active = rng.permutation(np.flatnonzero(remaining >= 2))
    client = InProcessMiner(index)
    sel = MinedSelector(np.arange(num), "", pool_classes=pool, candidates="knn", images_per_class=2, client=client)
    sel(active, n, np.random.default_rng(0), remaining)  # warm-up
    client.search_s, times = 0.0, []
    for rep in range(reps):
        start = time.perf_counter()
        picked = sel(active, n, np.random.default_rng(rep + 1), remaining)
        times.append(time.perf_counter() - start)
        assert len(set(picked.tolist())) == n and (remaining[picked] >= 2).all()
    recalls = []
    for rep in range(min(reps, 10)):  # the pool against an exact search over the active classes
        r = np.random.default_rng(rep + 1)
        cand, _ = sel.knn_candidates(active, pool, r, remaining)
        sims = unit @ unit[cand[0]]
        sims[remaining < 2] = -np.inf
        sims[cand[0]] = -np.inf
        exact = np.argpartition(-sims, pool - 1)[: pool - 1]
        recalls.append(len(set(exact.tolist()) & set(cand[1:].tolist())) / (pool - 1))
    return {"classes": num, "dim": dim, "index": kind, "pool": pool, "n": n, "build_s": build_s,
            "select_ms": 1000 * statistics.median(times), "select_p90_ms": 1000 * float(np.quantile(times, 0.9)),
            "search_ms": 1000 * client.search_s / reps, "pool_recall": float(np.mean(recalls)),
            "filled": sel.filled}


def actor_rtt(reps: int = 50) -> float:
    """Median seconds of one small call to a real MinerActor on a local Ray (the selector makes two per step)."""
    import ray

    from pipeline.mining.actor import get_or_create_miner

    ray.init(num_cpus=8, include_dashboard=False)
    try:
        miner = get_or_create_miner("bench-miner", dim=8)
        ray.get(miner.update.remote(np.arange(100), np.random.default_rng(0).standard_normal((100, 8))))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            ray.get(miner.neighbours.remote(5, 64))
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        ray.shutdown()


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
    parser.add_argument("--index", nargs="+", default=None, choices=["flat", "ivf", "hnsw"],
                        help="index kind(s); default flat, with --knn ivf and hnsw")
    parser.add_argument("--knn", action="store_true", help="time the knn-candidate selection per step")
    parser.add_argument("--pool", type=int, default=64, help="--knn: candidate classes C per step")
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
    if args.knn:
        kinds = args.index or ["ivf", "hnsw"]
        rows = []
        print(f"{'C':>9} {'index':>5} {'build s':>8} {'search ms':>9} {'select ms':>9} {'p90 ms':>7} {'recall':>6}")
        for num in args.classes:
            if args.max_classes is not None and num > args.max_classes:
                continue
            for kind in kinds:
                row = bench_knn(num, args.dim, kind, args.pool, args.n[0], max(args.reps, 20), args.seed)
                rows.append(row)
                print(f"{num:>9} {kind:>5} {row['build_s']:>8.2f} {row['search_ms']:>9.2f} {row['select_ms']:>9.2f} "
                      f"{row['select_p90_ms']:>7.2f} {row['pool_recall']:>6.2f}", flush=True)
        rtt = actor_rtt()
        print(f"actor round trip (neighbours, small): {1000 * rtt:.2f} ms; the selector makes 2 per step")
        print(json.dumps({"bench": "mining_knn", "threads": threads, "loadavg_1m": os.getloadavg()[0],
                          "rtt_ms": 1000 * rtt, "results": rows}))
        return
    head = f"{'C':>9} {'build s':>8} {'gather':>7}"
    for n in args.n:
        head += f" {'sel N=' + str(n):>10} {'limit':>8} {'ratio':>6}"
    print(head)
    rows = []
    for num in args.classes:
        if args.max_classes is not None and num > args.max_classes:
            continue
        reps = 1 if num >= 1_000_000 else args.reps
        row = bench_one(num, args.dim, args.n, (args.index or ["flat"])[0], reps, args.seed)
        rows.append(row)
        line = f"{num:>9} {row['build_s']:>8.3f} {row['gather_s']:>7.3f}"
        for n in args.n:
            line += f" {row[f'select_N{n}_s']:>10.3f} {row[f'limit_N{n}_s']:>8.3f} {row[f'ratio_N{n}']:>6.2f}"
        print(line, flush=True)
    print(json.dumps({"bench": "mining", "threads": threads, "loadavg_1m": os.getloadavg()[0], "results": rows}))


if __name__ == "__main__":
    main()
