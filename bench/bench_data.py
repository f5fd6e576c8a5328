"""Data stream throughput against the local decode limit, at 112x112 and 224x224.

    python bench/bench_data.py [--sizes 112 224] [--classes 200] [--per-class 20] [--epochs 2] [--profile DIR]

For each image size, on synthetic class-grouped shards:
  * limit: decode + flip (the stream's own ``decode_into``) in a tight loop over in-memory
    JPEG bytes, one process per core, summed; each process warms up (imports, first decode)
    before it is timed and runs for at least ~2 s;
  * stream: images/s of the full Ray Data stream (planner slice + read by index + decode + flip) delivered
    to a consumer that does nothing, as the cores divided by the CPU seconds that this
    driver and every process it started (our Ray session only: GCS, raylet, workers) spend
    per delivered image (see ``stream_rate``): the headline is the steady "window" of the
    3E-pass run (CPU between 20% and 80% of its images delivered: same processes, start-up
    outside); "marginal" = the extra CPU per extra image between a run of E passes and one of
    3E (``marginal_rate``; noisy, as Ray reuses and renames worker processes between runs);
    "whole run" = the 3E-pass run with its start-up. The CPU split per process kind is printed;
  * read stage alone: our tar parser (``pipeline.data.reader.iter_samples``) vs plain
    ``tarfile`` iteration, in this process, CPU seconds per sample.
With ``--profile DIR`` it also runs the stream a second time sampled by py-spy (``py-spy record
--subprocesses``, raw collapsed stacks in DIR) and prints where each process kind spends
its samples. Prints a table and one final JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _decode_loop(args) -> tuple[int, float]:
    jpgs, size, min_s = args
    import numpy as np
    import torch

    from pipeline.data.decode import decode_into

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    out = np.empty((256, size, size, 3), dtype=np.uint8)
    decode_into(jpgs[:256], out)  # warm-up: imports and libjpeg's first call are not decode work
    t, c = time.perf_counter(), time.process_time()
    n = 0
    while time.perf_counter() - t < min_s:
        for i in range(0, len(jpgs), 256):
            chunk = jpgs[i : i + 256]
            decode_into(chunk, out[: len(chunk)], rng.random(len(chunk)) < 0.5)
            n += len(chunk)
    return n, time.process_time() - c


def decode_limit(jpgs: list[bytes], size: int, cores: int, min_s: float = 2.0) -> float:
    """Images/s of decode + flip over in-memory JPEGs, one process per core (from CPU time:
    cores / CPU seconds per image, so other jobs on the machine do not lower it)."""
    chunks = [jpgs[i::cores] for i in range(cores)]
    with mp.get_context("spawn").Pool(cores) as pool:
        out = pool.map(_decode_loop, [(c, size, min_s) for c in chunks])
    return cores * sum(n for n, _ in out) / sum(dt for _, dt in out)


def tar_rate(paths: list[str]) -> float:
    """Samples/s of plain tarfile iteration (read every member's bytes) on one core (CPU time)."""
    t = time.process_time()
    n = 0
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf:
                if m.isfile():
                    tf.extractfile(m).read()
                    n += 1
    return n / 2 / (time.process_time() - t)  # 2 members (.jpg, .cls) per sample


def reader_rate(paths: list[str]) -> float:
    """Samples/s of our tar parser (``pipeline.data.reader.iter_samples``: what ``--reindex`` runs) on one core (CPU time)."""
    from pipeline.data.reader import iter_samples

    t = time.process_time()
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += sum(1 for _ in iter_samples(f, p))
    return n / (time.process_time() - t)


STREAM_WORK = ("ray::FetchDecode", "ray::PlannerActor", "driver (consumer + Ray Data executor)")
"""The process kinds doing the stream's work (the rest is Ray's idle workers and daemons)."""


def _kind(cmdline: list[str], pid: int) -> str:
    """A process's role: the driver, a Ray daemon, or a Ray worker (by the task it runs)."""
    if pid == os.getpid():
        return "driver (consumer + Ray Data executor)"
    cmd = " ".join(cmdline)
    if "py-spy" in cmd:
        return "py-spy (the profiler; not counted)"
    for daemon in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if daemon in cmd:
            return daemon
    if cmd.startswith("ray::"):
        name = cmd.split()[0]
        for stage in ("FetchDecode", "PlannerActor", "IDLE", "StatsActor", "AutoscalingCoordinator",
                      "ActorLocationTracker"):
            if stage in name:
                return f"ray::{stage}"
        return "ray::other workers"
    return cmd.split()[0].rsplit("/", 1)[-1] if cmd else "(no command line)"


class CpuMeter:
    """CPU seconds of this process and every process it started (our Ray session), by kind.

    Polled every ``interval`` s from a thread, so the CPU of a worker that exits before the
    end (an actor pool scaled down) is still counted up to its last poll.
    """

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.psutil, self.interval = psutil, interval
        self.base: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.kinds: dict[int, str] = {}
        """pid -> process kind of every process seen."""
        self.own_s = 0.0
        """CPU seconds of the polling itself (taken off the driver's)."""
        self._stop = threading.Event()
        self._poll(into=self.base)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self, into: dict | None = None) -> None:
        me = self.psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cpu = t.user + t.system
                    kind = _kind(p.cmdline() or [p.name()], p.pid)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            self.kinds[p.pid] = kind
            if into is not None:
                into[p.pid] = cpu
            else:
                self.last[p.pid] = (kind, cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            t = time.thread_time()
            self._poll()
            self.own_s += time.thread_time() - t

    def start(self) -> "CpuMeter":
        self._thread.start()
        return self

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """CPU seconds per pid right now (a synchronous poll)."""
        t = time.thread_time()
        self._poll()
        self.own_s += time.thread_time() - t
        return {pid: v for pid, v in self.last.items()}

    @staticmethod
    def between(a: dict, b: dict) -> dict[str, float]:
        """CPU seconds per process kind from snapshot ``a`` to snapshot ``b`` (the meter's own polls
        are left in: a few ms per poll, charged to the driver)."""
        out: dict[str, float] = collections.defaultdict(float)
        for pid, (kind, cpu) in b.items():
            if not kind.startswith("py-spy"):
                out[kind] += cpu - a.get(pid, (kind, 0.0))[1]
        return dict(out)

    def stop(self) -> dict[str, float]:
        """CPU seconds per process kind since the meter was made."""
        self._stop.set()
        self._thread.join()
        self._poll()
        out: dict[str, float] = collections.defaultdict(float)
        for pid, (kind, cpu) in self.last.items():
            if not kind.startswith("py-spy"):
                out[kind] += cpu - self.base.get(pid, 0.0) - (self.own_s if pid == os.getpid() else 0.0)
        return dict(out)


def _spy_start(out: str):
    """py-spy sampling this process and all its descendants (raw collapsed stacks, on-CPU
    samples only), or None without py-spy."""
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        print(f"[bench_data] no py-spy at {exe} (pip install py-spy): no profile", flush=True)
        return None
    return subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--subprocesses", "--nonblocking",
                             "--rate", "100", "--format", "raw", "-o", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _frame_owner(py: list[str]) -> str:
    """Who a sample's time belongs to: the deepest frame in our package, else the leaf's library."""
    for f in reversed(py):
        if "pipeline/" in f:
            return f.split(" (")[0]
    if not py:
        return "(native, no Python frame)"
    leaf = py[-1]
    for lib in ("ray/data", "ray/_private", "ray/", "pyarrow", "numpy", "torch", "threading", "concurrent"):
        if lib in leaf:
            return f"<{lib.rstrip('/')}> " + leaf.split(" (")[0]
    return leaf.split(" (")[0]


def _spy_stop(proc, out: str, kinds: dict[int, str] | None = None) -> dict:
    """Stop py-spy and summarise per process kind: on-CPU samples, and their split by owner
    (the deepest ``pipeline/`` function on the stack, else the leaf function and its library).
    ``kinds`` maps pids to process kinds (``CpuMeter.kinds``: py-spy keeps the command line a
    Ray worker had before it renamed itself)."""
    import signal

    if proc is None:
        return {}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    if not os.path.exists(out):
        return {}
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            procs = [x for x in frames if x.startswith("process ")]
            py = [x for x in frames if not x.startswith("process ")]
            head = procs[-1] if procs else "?"
            # 'process <pid>:"<command line>"'
            pid = int(head[len("process "):].split(":", 1)[0]) if procs else -1
            cmd = head.split(":", 1)[1].strip('"') if procs else ""
            kind = (kinds or {}).get(pid) or _kind(cmd.split(), pid)
            per[kind][_frame_owner(py)] += int(count)
    return {k: {"samples": sum(c.values()), "top": c.most_common(12)}
            for k, c in sorted(per.items(), key=lambda kv: -sum(kv[1].values()))}


def stream_rate(train_dir: str, size: int, epochs: float = 4, classes_per_batch: int = 16,
                profile: str | None = None, expected_images: int | None = None, decoders: int = 2,
                start_step: int = 0, raw: bool = False) -> dict:
    """Images/s the full stream can sustain on this machine's cores, from its CPU cost.

    Ray Data decodes ahead into the object store while workers start, so a wall-clock rate
    after the first batch counts buffered work as free (and a differential of two runs is
    dominated by start-up noise). The CPU seconds that this driver and every process of our
    Ray session spend per delivered image are not fooled by buffering: sustainable images/s
    = cores / CPU-seconds-per-image. This charges Ray's own daemons (GCS, raylet) to the
    stream, an upper bound on its cost; other jobs on the machine are not counted. The
    wall-clock rate is reported beside it.

    Over the whole run, start-up is included (every Ray worker imports torch and pyarrow:
    a few CPU-seconds that a long training run amortises); ``marginal_rate`` of two runs
    removes it. "window": between the moments 20% and 80% of ``expected_images`` had been
    delivered; biased low, because the composer runs far ahead (JPEG rows are small) and
    does most of its work before the window; with ``profile`` py-spy samples that window.
    ``raw``: the stream of ``data.decode_device: cuda`` (rows of JPEG bytes), decoded here by
    the train loop's ``decode_batch`` on the CPU: the consumer stands for the training process.
    """
    import ray

    from pipeline.config import load_config
    from pipeline.data.planner_actor import create_planner
    from pipeline.data.stream import build_train_datasets, done_every, stream_shape

    with open(os.path.join(os.path.dirname(train_dir), "manifest.json")) as f:
        images = json.load(f)["splits"]["train"]["images"]
    steps = max(1, int(epochs * images) // (2 * classes_per_batch))
    cfg = load_config(None, [f"data.train={train_dir}", f"data.image_size={size}", "scaling.num_workers=1",
                             f"batch.classes_per_batch={classes_per_batch}", f"train.steps={steps + start_step}",
                             f"data.decode_concurrency={decoders}", "data.augment=flip"])  # as its limit
    name = f"bench-planner-{time.monotonic_ns()}"
    planner = create_planner(name, os.path.dirname(train_dir), classes_per_batch, 2, 1, 0, max_lead=stream_shape(cfg)[1])
    state = None
    if start_step:  # the planner's state as of start_step, as a checkpoint would hold it
        from pipeline.data.index import class_ranges, load_index
        from pipeline.data.planner import BatchPlanner

        ref = BatchPlanner(*class_ranges(load_index(os.path.dirname(train_dir), "train")),
                           classes_per_batch=classes_per_batch, images_per_class=2, world_size=1, seed=0,
                           max_lead=start_step + 1, rewind_window=start_step + 1)
        for step in range(start_step):
            ref.plan(step)
        state = ref.state_dict(start_step)
    meter = CpuMeter().start()
    t_begin = time.perf_counter()
    ray.get(planner.begin.remote(start_step, state))
    expected = expected_images or 0
    spy = None
    t0 = time.perf_counter()
    t_first, n, marks, every = None, 0, {}, done_every(cfg)
    from pipeline.data.decode import decode_batch

    for b in build_train_datasets(cfg, name, start_step, raw=raw)["train_0"].iter_batches(batch_size=1,
                                                                                          batch_format="numpy"):
        if int(b["step"][0]) % every == 0:  # as the train loop reports its steps
            planner.done.remote(int(b["step"][0]), 0)
        t_first = t_first or time.perf_counter()
        if raw:
            if not b["skip"][0]:
                decode_batch(b["jpeg"][0], b["jpeg_offsets"][0], b["flips"][0], size, "cpu")
            n += len(b["jpeg_offsets"][0]) - 1
        else:
            n += b["images"].shape[1]
        if "a" not in marks and expected and n >= 0.2 * expected:
            marks["a"] = (n, time.perf_counter(), meter.snapshot())
            spy = _spy_start(profile) if profile else None  # sample the steady part only
        if "b" not in marks and expected and n >= 0.8 * expected:
            marks["b"] = (n, time.perf_counter(), meter.snapshot())
            prof = _spy_stop(spy, profile, meter.kinds) if spy else {}
    wall = time.perf_counter() - t0
    ray.kill(planner)
    time.sleep(1.0)  # let actors finish their last accounting
    split = meter.stop()
    cpu = sum(split.values())
    cores = os.cpu_count() or 1
    out = {"images_per_s": cores * n / cpu, "cpu_ms_per_image": 1e3 * cpu / n, "wall_images_per_s": n / wall,
           "startup_s": t_first - t0, "restore_s": t0 - t_begin, "images": n, "cpu_s": cpu, "cpu_s_by_process": split,
           "cpu_ms_per_image_by_process": {k: 1e3 * v / n for k, v in sorted(split.items(), key=lambda kv: -kv[1])},
           "profile": prof if "b" in marks else {}}
    if len(marks) == 2:
        (na, ta, sa), (nb, tb, sb) = marks["a"], marks["b"]
        mid = CpuMeter.between(sa, sb)
        mid_cpu = sum(mid.values())
        out.update({"window_images": nb - na, "window_images_per_s": cores * (nb - na) / mid_cpu,
                    "window_cpu_ms_per_image": 1e3 * mid_cpu / (nb - na),
                    "window_wall_images_per_s": (nb - na) / (tb - ta),
                    "window_cpu_ms_per_image_by_process": {
                        k: 1e3 * v / (nb - na) for k, v in sorted(mid.items(), key=lambda kv: -kv[1])}})
    return out


def marginal_rate(short: dict, long: dict) -> dict:
    """Steady-state cost from two complete runs of different length (same shards): the extra CPU
    per extra image. Start-up (imports in every worker, actor creation) cancels, and unlike a
    time window inside one run, no stage's read-ahead can fall outside the measurement."""
    cores = os.cpu_count() or 1
    dn = long["images"] - short["images"]
    kinds = set(short["cpu_s_by_process"]) | set(long["cpu_s_by_process"])
    by = {k: 1e3 * (long["cpu_s_by_process"].get(k, 0.0) - short["cpu_s_by_process"].get(k, 0.0)) / dn for k in kinds}
    dcpu = long["cpu_s"] - short["cpu_s"]
    return {"images": dn, "images_per_s": cores * dn / dcpu, "cpu_ms_per_image": 1e3 * dcpu / dn,
            "cpu_ms_per_image_by_process": dict(sorted(by.items(), key=lambda kv: -kv[1]))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[112, 224])
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2, help="passes of the short run; the long run makes 3x as many")
    p.add_argument("--classes-per-batch", type=int, default=16, help="N of the composed batches (1 rank)")
    p.add_argument("--profile", default="", help="directory for py-spy profiles of the stream (one per size)")
    p.add_argument("--raw-only", action="store_true",
                   help="only the limit and the long run's window, for pixel rows and for JPEG-byte rows decoded "
                        "by the consumer (data.decode_device: cuda's stream, decoded on the CPU)")
    args = p.parse_args()
    import ray
    import ray.data

    from pipeline.data.layouts import synthetic_classes
    from pipeline.data.manifest import list_shards
    from pipeline.data.shards import write_shards

    cores = os.cpu_count() or 1
    ray.data.DataContext.get_current().enable_progress_bars = False
    from pipeline.runtime import init_ray

    init_ray(max(8, 4 * cores))  # local, loopback only
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    results = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as work:
            classes = synthetic_classes(args.classes, args.per_class, image_size=size, seed=0)
            write_shards(classes, work, holdout_fraction=0.0, shard_size=500, progress=False)
            jpgs = [b for c in classes for b in c.images]
            paths, _ = list_shards(f"{work}/train")
            load0 = os.getloadavg()[0]
            limit = decode_limit(jpgs, size, cores)
            total = len(jpgs) * args.epochs
            if args.raw_only:
                stream_rate(f"{work}/train", size, 1, args.classes_per_batch)  # warm-up, as below
                rows = {kind: stream_rate(f"{work}/train", size, 3 * args.epochs, args.classes_per_batch,
                                          expected_images=3 * total, raw=kind == "jpeg")
                        for kind in ("pixels", "jpeg")}
                results[size] = {"limit_images_per_s": limit, "load_avg_1m_before": load0,
                                 "load_avg_1m_after": os.getloadavg()[0]}
                for kind, r in rows.items():
                    ratio = r.get("window_images_per_s", 0.0) / limit
                    results[size][kind] = {"ratio_window_to_limit": ratio, **{
                        k: r.get(k) for k in ("window_cpu_ms_per_image", "window_cpu_ms_per_image_by_process",
                                              "window_wall_images_per_s")}}
                    print(f"{size}x{size}, rows of {kind}: window {r.get('window_cpu_ms_per_image', 0):.4f} CPU-ms/image "
                          f"-> ratio {ratio:.2f} to the decode limit ({1e3 * cores / limit:.4f} CPU-ms/image); by "
                          f"process {json.dumps({k: round(v, 4) for k, v in r.get('window_cpu_ms_per_image_by_process', {}).items()})}",
                          flush=True)
                continue
            # Warm-up: Ray Data's session-wide actors (stats, autoscaling coordinator) and the idle
            # worker pool start with the first dataset; without this the short run pays for them
            # and the marginal cost comes out too low.
            stream_rate(f"{work}/train", size, 1, args.classes_per_batch)
            short = stream_rate(f"{work}/train", size, args.epochs, args.classes_per_batch, expected_images=total)
            stream = stream_rate(f"{work}/train", size, 3 * args.epochs, args.classes_per_batch,
                                 expected_images=3 * total)
            marginal = marginal_rate(short, stream)
            if args.profile:  # a third run: py-spy's sampling slows what it samples
                stream["profile"] = stream_rate(f"{work}/train", size, 3 * args.epochs, args.classes_per_batch,
                                                os.path.join(args.profile, f"stream_{size}.txt"),
                                                expected_images=3 * total)["profile"]
            # 1 vs 2 fetch+decode actors (wall clock: what a trainer would see), and the start-up
            # of a stream resumed at 90% of a pass (planner state restored) vs a fresh one.
            one = stream_rate(f"{work}/train", size, args.epochs, args.classes_per_batch, decoders=1)
            pass_steps = len(jpgs) // (2 * args.classes_per_batch)
            # Alternated, 3 of each: on a shared 2-core machine one pair is mostly noise.
            starts = {"fresh": [], "resumed": []}
            for _ in range(3):
                starts["fresh"].append(stream_rate(f"{work}/train", size, 0.05, args.classes_per_batch))
                starts["resumed"].append(stream_rate(f"{work}/train", size, 0.05, args.classes_per_batch,
                                                     start_step=int(0.9 * pass_steps)))
            first_row = {k: sorted(r["startup_s"] + r["restore_s"] for r in v) for k, v in starts.items()}
            resumed = starts["resumed"][0]
            tar = tar_rate(paths)
            read = reader_rate(paths)
        r = {"limit_images_per_s": limit, "limit_cpu_ms_per_image": 1e3 * cores / limit,
             **{f"stream_{k}": v for k, v in stream.items() if k != "cpu_s_by_process"},
             **{f"marginal_{k}": v for k, v in marginal.items()},
             "ratio_marginal_to_limit": marginal["images_per_s"] / limit,
             # The stream's own work alone (fetch/decode actors + planner + consumer), without Ray's
             # idle workers and daemons, whose CPU goes with wall time, not with images.
             "ratio_stream_work_to_limit": (1e3 * cores / limit) / sum(
                 marginal["cpu_ms_per_image_by_process"].get(k, 0.0) for k in STREAM_WORK),
             "ratio_whole_run_to_limit": stream["images_per_s"] / limit,
             "wall_images_per_s_1_decoder": one["wall_images_per_s"], "wall_images_per_s_2_decoders": short["wall_images_per_s"],
             "cpu_images_per_s_1_decoder": one["images_per_s"], "cpu_images_per_s_2_decoders": short["images_per_s"],
             "fresh_first_row_s": first_row["fresh"][1], "resumed_first_row_s": first_row["resumed"][1],
             "fresh_first_row_s_all": first_row["fresh"], "resumed_first_row_s_all": first_row["resumed"],
             "resumed_restore_s": resumed["restore_s"],
             "reader_ms_per_sample": 1e3 / read, "tarfile_ms_per_sample": 1e3 / tar,
             "load_avg_1m_before": load0, "load_avg_1m_after": os.getloadavg()[0]}
        results[size] = r
        r["ratio_window_to_limit"] = stream.get("window_images_per_s", 0.0) / limit
        print(f"{size}x{size} on {cores} cores: steady window of the long run {stream.get('window_images_per_s', 0):.0f} "
              f"img/s ({stream.get('window_cpu_ms_per_image', 0):.4f} CPU-ms/image) -> ratio "
              f"{r['ratio_window_to_limit']:.2f} (the headline; BENCHMARKS.md)", flush=True)
        print(f"{size}x{size} on {cores} cores: limit {limit:.0f} img/s ({r['limit_cpu_ms_per_image']:.4f} CPU-ms/image); "
              f"stream marginal {marginal['images_per_s']:.0f} img/s ({marginal['cpu_ms_per_image']:.4f} CPU-ms/image) "
              f"-> ratio {r['ratio_marginal_to_limit']:.2f} (stream work alone {r['ratio_stream_work_to_limit']:.2f}); whole {3 * args.epochs}-pass run incl. start-up "
              f"{stream['images_per_s']:.0f} img/s ({stream['cpu_ms_per_image']:.3f}) -> {r['ratio_whole_run_to_limit']:.2f}; "
              f"wall {stream['wall_images_per_s']:.0f} img/s (start-up {stream['startup_s']:.1f}s); reader "
              f"{1e3 / read:.4f} ms/sample vs tarfile {1e3 / tar:.4f}; load average {load0:.1f} -> "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        print(f"    1 vs 2 decode actors: wall {one['wall_images_per_s']:.0f} vs {short['wall_images_per_s']:.0f} img/s, "
              f"CPU-based {one['images_per_s']:.0f} vs {short['images_per_s']:.0f}; first row (median of 3, all): fresh "
              f"{r['fresh_first_row_s']:.2f}s {[round(x, 2) for x in first_row['fresh']]}, resumed at 90% of a pass "
              f"{r['resumed_first_row_s']:.2f}s {[round(x, 2) for x in first_row['resumed']]} (planner begin with "
              f"its state {resumed['restore_s']:.3f}s)", flush=True)
        for kind, ms in stream.get("window_cpu_ms_per_image_by_process", {}).items():
            print(f"    {ms:8.4f} CPU-ms/image in the steady window  {kind}", flush=True)
        for kind, ms in marginal["cpu_ms_per_image_by_process"].items():
            print(f"    {ms:8.4f} CPU-ms/image marginal, {stream['cpu_ms_per_image_by_process'].get(kind, 0):8.4f} "
                  f"whole run  {kind}", flush=True)
        for kind, prof in stream["profile"].items():
            print(f"    py-spy (20%-80% window) {kind}: {prof['samples']} on-CPU samples: "
                  + ", ".join(f"{f} {100 * c / prof['samples']:.0f}%" for f, c in prof["top"][:6]), flush=True)
    ray.shutdown()
    print(json.dumps({"bench": "data", "cores": cores, "load_avg_1m": os.getloadavg()[0],
                      "results": {str(k): v for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
