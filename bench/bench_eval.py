"""Benchmark Recall@K at scale: our chunked leave-one-out evaluation vs one raw FAISS flat search.

    python bench/bench_eval.py                 # 1M x 128-d, 100k classes x 10
    python bench/bench_eval.py --n 200000      # smaller; search cost grows as n^2

Reports wall time and peak memory of ``recall_at_k`` (ru_maxrss for the whole
process, tracemalloc for NumPy/Python allocations; FAISS's own C++ buffers are
only in ru_maxrss), then the time of a bare ``IndexFlatIP.search`` of the same
queries for k = max(ks) + 1, which is the floor for exact search on this machine.
The last line printed is a JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
import tracemalloc

import faiss
import numpy as np

from pipeline.eval.retrieval import DEFAULT_CHUNK_SIZE, normalize, recall_at_k


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="number of embeddings")
    parser.add_argument("--d", type=int, default=128, help="embedding dimension")
    parser.add_argument("--per-class", type=int, default=10, help="samples per class")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="queries per FAISS call")
    parser.add_argument("--skip-raw", action="store_true", help="skip the raw FAISS search baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ks = (1, 2, 4, 8)

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.n, args.d), dtype=np.float32)
    labels = np.arange(args.n) // args.per_class
    rss_data = _maxrss_gib()
    print(f"data: {args.n} x {args.d} float32 ({x.nbytes / 2**30:.2f} GiB), {labels.max() + 1} classes; "
          f"rss {rss_data:.2f} GiB; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)

    tracemalloc.start()
    t0, c0 = time.perf_counter(), _cpu_s()
    recalls = recall_at_k(x, labels, ks, chunk_size=args.chunk_size)
    ours_s, ours_cpu = time.perf_counter() - t0, _cpu_s() - c0
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**30
    tracemalloc.stop()
    rss_ours = _maxrss_gib()
    print(f"ours: {ours_s:.1f} s wall, {ours_cpu:.1f} s cpu, recall {recalls}, peak rss {rss_ours:.2f} GiB, "
          f"tracemalloc peak {traced_peak:.2f} GiB", flush=True)

    raw_s = raw_cpu = None
    if not args.skip_raw:
        xn = normalize(x)
        index = faiss.IndexFlatIP(args.d)
        index.add(xn)
        t0, c0 = time.perf_counter(), _cpu_s()
        index.search(xn, max(ks) + 1)
        raw_s, raw_cpu = time.perf_counter() - t0, _cpu_s() - c0
        print(f"raw IndexFlatIP.search(k={max(ks) + 1}): {raw_s:.1f} s wall, {raw_cpu:.1f} s cpu", flush=True)

    record = {
        "bench": "eval_recall_at_k",
        "n": args.n,
        "d": args.d,
        "classes": int(labels.max() + 1),
        "chunk_size": args.chunk_size,
        "threads": faiss.omp_get_max_threads(),
        "cpu": platform.processor() or platform.machine(),
        "ours_s": round(ours_s, 2),
        "raw_search_s": None if raw_s is None else round(raw_s, 2),
        "ratio_ours_over_raw": None if raw_s is None else round(ours_s / raw_s, 3),
        "ours_cpu_s": round(ours_cpu, 2),
        "raw_search_cpu_s": None if raw_cpu is None else round(raw_cpu, 2),
        "cpu_ratio_ours_over_raw": None if raw_cpu is None else round(ours_cpu / raw_cpu, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "peak_rss_gib": round(rss_ours, 3),
        "rss_after_data_gib": round(rss_data, 3),
        "tracemalloc_peak_gib": round(traced_peak, 3),
        **{f"recall@{k}": v for k, v in recalls.items()},
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
