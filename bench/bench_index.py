"""Random access to single samples: our per-sample index (``pipeline.data.index``) against WebDataset's ``wids``.

    python bench/bench_index.py [--shards 40] [--per-shard 500] [--batch 384] [--batches 30] [--reps 3]

Writes ``--shards`` x ``--per-shard`` samples of 112 px synthetic faces (~4.3 kB JPEGs,
CASIA-WebFace at 112 px is ~3.5 kB) with ``write_shards`` (20 images a class), then reads
``--batches`` batches of ``--batch`` samples, per batch either uniformly random rows or
``batch/2`` random classes x 2 of their samples (what the batch planner asks), and prints
microseconds per sample for:

  * ``ours pread``: :func:`pipeline.data.index.read_samples` (one ``os.open`` per shard per
    call, ``os.pread`` per sample in offset order);
  * ``ours seek+read``: the same grouping with an unbuffered file's ``seek`` + ``read``;
  * ``wids warm``: ``wids.ShardListDataset[i]`` with every shard already open (``lru_size`` =
    all shards; it returns every member of the sample: ``.jpg`` and ``.cls``);
  * ``wids lru 10``: the same with wids's default ``lru_size=10``: a miss re-opens the
    shard and re-scans its headers (3 batches, once: it is milliseconds a sample);
and the opening costs: ours ``load_index`` (the whole index), wids per shard (its scan).
Everything is in the page cache (the shards were just written): this is the CPU cost of
the access path, not the disk's. ``wids`` is the separate ``wids`` package
(``pip install wids``; not a dependency of the project); without it those rows are skipped.
Best of ``--reps``. Prints a table, the index size at CASIA-WebFace and WebFace42M scale,
and one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASIA = (494_414, 10_575)
WEBFACE42M = (42_474_558, 2_059_906)


def _shard_set(out: Path, shards: int, per_shard: int) -> None:
    from pipeline.data.layouts import ClassItems, synthetic_classes
    from pipeline.data.shards import write_shards

    pool = [b for c in synthetic_classes(10, 20, image_size=112, seed=0) for b in c.images]
    per_class, n = 20, shards * per_shard
    classes = [ClassItems(f"c{c:06d}", [pool[(c * per_class + i) % len(pool)] for i in range(per_class)],
                          [f"{i:04d}" for i in range(per_class)]) for c in range(n // per_class)]
    write_shards(classes, out, holdout_fraction=0.0, shard_size=per_shard, exemplars=0, progress=False)


def _seek_read(index, ids) -> list[bytes]:
    """read_samples' grouping with seek + read on an unbuffered file instead of pread."""
    ids = np.asarray(ids, dtype=np.int64)
    shard, offset, size = index.shard[ids].astype(np.int64), index.offset[ids].astype(np.int64), index.size[ids]
    order = np.lexsort((offset, shard))
    out = [b""] * len(ids)
    rows = list(zip(order.tolist(), shard[order].tolist(), offset[order].tolist(), size[order].tolist()))
    i = 0
    while i < len(rows):
        s = rows[i][1]
        with open(index.paths[s], "rb", buffering=0) as f:
            while i < len(rows) and rows[i][1] == s:
                k, _, o, n = rows[i]
                f.seek(o)
                out[k] = f.read(n)
                i += 1
    return out


def _batches(index, n_batches: int, batch: int, mode: str, seed: int = 0) -> list[np.ndarray]:
    from pipeline.data.index import class_ranges

    rng = np.random.default_rng(seed)
    if mode == "uniform":
        return [rng.integers(0, len(index), batch) for _ in range(n_batches)]
    ids, starts, counts = class_ranges(index)
    out = []
    for _ in range(n_batches):
        cls = rng.choice(len(ids), min(batch // 2, len(ids)), replace=False)
        out.append(np.concatenate([starts[c] + rng.choice(counts[c], 2, replace=False) for c in cls]))
    return out


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=40)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--batch", type=int, default=384)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    from pipeline.data.index import load_index, read_samples

    try:
        import wids
    except ImportError:
        wids = None
        print("wids not installed (pip install wids): its rows are skipped", file=sys.stderr)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_index_") as work:
        out = Path(work) / "shards"
        _shard_set(out, args.shards, args.per_shard)
        results["load_index_ms"] = 1e3 * _best(lambda: load_index(out), args.reps)
        index = load_index(out)
        header = (out / "index-train.json").stat().st_size
        bin_bytes = (out / "index-train.bin").stat().st_size
        for mode in ("uniform", "classes"):
            batches = _batches(index, args.batches, args.batch, mode)
            n_samples = sum(len(b) for b in batches)
            results[f"ours_pread_{mode}_us"] = 1e6 / n_samples * _best(
                lambda bs=batches: [read_samples(index, b) for b in bs], args.reps)
            results[f"ours_seek_{mode}_us"] = 1e6 / n_samples * _best(
                lambda bs=batches: [_seek_read(index, b) for b in bs], args.reps)
            assert _seek_read(index, batches[0]) == read_samples(index, batches[0])
            if wids is None:
                continue
            shardlist = [{"url": p_, "nsamples": int(n)} for p_, n in zip(index.paths, np.diff(index.shard_rows))]
            for name, lru in (("wids_warm", len(shardlist)), ("wids_lru10", 10)):
                ds = wids.ShardListDataset(shardlist, lru_size=lru, localname=lambda u: u, transformations=[])
                if lru == len(shardlist):
                    for s in np.asarray(index.shard_rows[:-1]):  # open (scan) every shard before timing
                        ds[int(s)]
                    got = [ds[int(i)][".jpg"].getvalue() for i in batches[0]]
                    assert got == read_samples(index, batches[0]), "wids and the index disagree"
                # A thrashing LRU costs milliseconds a sample: 3 batches, once, are enough to see it.
                some, reps = (batches, args.reps) if lru == len(shardlist) else (batches[:3], 1)
                results[f"{name}_{mode}_us"] = 1e6 / sum(len(b) for b in some) * _best(
                    lambda ds=ds, some=some: [[ds[int(i)][".jpg"] for i in b] for b in some], reps)
                ds.close()
            if mode == "uniform":
                from wids.wids import IndexedTarSamples

                def open_all():
                    for p_ in index.paths:
                        IndexedTarSamples(path=p_).close()

                results["wids_open_ms_per_shard"] = 1e3 / len(index.paths) * _best(open_all, args.reps)
    per_row = bin_bytes / len(index)
    per_shard = header / len(index.paths)
    sizes = {
        "bytes_per_sample": round(per_row, 2),
        "header_bytes_per_shard": round(per_shard),
        "casia_mb": round(CASIA[0] * per_row / 1e6, 1),
        "casia_header_kb": round(-(-CASIA[0] // 1000) * per_shard / 1e3),
        "webface42m_mb": round(WEBFACE42M[0] * per_row / 1e6),
        "webface42m_header_mb": round(-(-WEBFACE42M[0] // 1000) * per_shard / 1e6, 1),
    }
    print(f"{len(index)} samples in {len(index.paths)} shards, batches of {args.batch}, best of {args.reps}")
    print(f"{'per sample (us)':<22}{'uniform rows':>14}{'classes x 2':>14}")
    for name in ("ours_pread", "ours_seek", "wids_warm", "wids_lru10"):
        if f"{name}_uniform_us" in results:
            print(f"{name:<22}{results[f'{name}_uniform_us']:>14.2f}{results[f'{name}_classes_us']:>14.2f}")
    print(f"load_index: {results['load_index_ms']:.2f} ms for the whole index"
          + (f"; wids open: {results['wids_open_ms_per_shard']:.2f} ms per shard"
             if "wids_open_ms_per_shard" in results else ""))
    print(f"index: {sizes['bytes_per_sample']} B/sample + {sizes['header_bytes_per_shard']} B/shard header -> "
          f"CASIA-WebFace {sizes['casia_mb']} MB + {sizes['casia_header_kb']} kB, "
          f"WebFace42M {sizes['webface42m_mb']} MB + {sizes['webface42m_header_mb']} MB (shards of 1000)")
    print(json.dumps({k: round(v, 3) for k, v in results.items()} | sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
