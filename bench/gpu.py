"""One prepared GPU benchmark: compute ceiling, the pipeline's cost, and FAISS mining at 1M classes.

    python bench/gpu.py [--budget-s 420] [--compile] [--batch 256] [--dry-run]

On one GPU, in under 8 minutes, it measures:
  1. the bf16 matmul rate (the denominator of MFU);
  2. training images/s of ResNet-50 at 224x224 and ResNet-50 / IResNet-50 at 112x112 on
     synthetic tensors (bf16 autocast, channels_last, optional torch.compile): the ceiling;
  3. the training step's options one at a time at ResNet-50@224: fp32, bf16 without
     channels_last, bf16 + torch.compile (all through ``pipeline.train.step.TrainStep``);
  4. the same ResNet-50 training fed by the real stream (synthetic JPEG shards -> Ray Data
     planned slices -> the training step) with ``data.decode_device`` ``cpu`` (the stream's
     actors decode) and ``cuda`` (JPEG bytes decoded on the GPU by the train loop's own code),
     with the fraction of step time spent waiting for data: the pipeline's cost;
  5. FAISS GPU index build (refresh) and greedy selection for 1M classes at d = 512.
Prints MFU (model FLOPs / measured bf16 matmul rate) and one final JSON line.

Needs only torch, ray, faiss and webdataset (plus this repository). Without a GPU it exits
with code 2 and says so; ``--dry-run`` runs the same logic on the CPU with a tiny model and
tiny sizes (for CI).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Forward + backward FLOPs per image (3x the forward multiply-adds x 2), from the standard
# counts: ResNet-50 at 224 has 4.1 GMACs forward -> 24.5 GFLOP per training image.
FLOPS_PER_IMAGE = {("resnet50", 224): 24.5e9, ("resnet50", 112): 24.5e9 / 4, ("iresnet50", 112): 6.3e9 * 2 * 3}


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_env(dry: bool):
    """Import what the benchmark needs or exit 2 naming what is missing; returns (torch, device)."""
    missing = []
    for mod in ("torch", "ray", "faiss", "webdataset", "numpy"):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        fail(f"missing Python packages: {', '.join(missing)} (pip install torch 'ray[data]' faiss-gpu webdataset)")
    import torch

    if dry:
        return torch, torch.device("cpu")
    if not torch.cuda.is_available():
        fail("no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
             "run on a GPU machine, or pass --dry-run to check the logic on the CPU")
    return torch, torch.device("cuda")


def matmul_rate(torch, device, dry: bool) -> float:
    """Measured bf16 (GPU) / fp32 (CPU dry run) matmul FLOP/s on large square matrices."""
    n = 256 if dry else 8192
    dtype = torch.float32 if dry else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(torch, device)
    reps = 5 if dry else 50
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(torch, device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, torch, dry: bool):
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    if dry:
        name = "tiny"
    try:
        return build_model(ModelConfig(backbone=name, embedding_dim=512))
    except ValueError:
        return None


def train_rate(torch, device, model, size: int, batch: int, steps: int, compile_: bool, batches=None,
               precision: str | None = None, channels_last: bool = True) -> dict:
    """Images/s of N-pair training steps; ``batches`` (an iterator of (images, labels)) = real stream.

    ``precision``: the step's ``train.precision`` (default bf16 on a GPU, fp32 on the CPU)."""
    from pipeline.config import load_config
    from pipeline.losses import build_loss
    from pipeline.train.step import MetricObjective, TrainStep, make_optimizer, make_scheduler

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_ else model
    # The project's own step (pipeline.train.step), as jobs.train runs it: bf16 on the GPU.
    cfg = load_config(None, ["train.lr=0.01", f"train.steps={steps + 3}", "train.weight_decay=0"])
    opt = make_optimizer(cfg, model)
    train_step = TrainStep(forward, MetricObjective(build_loss("npair_mc")), opt, make_scheduler(cfg, opt),
                           precision=precision or ("bf16" if device.type == "cuda" else "fp32"), device=device)
    labels = torch.arange(batch // 2, device=device).repeat_interleave(2)
    synth = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device=device)
    wait = 0.0
    done = 0
    t0 = None
    for i in range(steps + 3):
        if i == 3:  # warm-up steps excluded (cudnn autotune, compile)
            sync(torch, device)
            t0, wait, done = time.perf_counter(), 0.0, 0
        if batches is not None:
            tw = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            wait += time.perf_counter() - tw
        else:
            x, y = synth, labels
        train_step(x, y)
        done += x.shape[0]
    sync(torch, device)
    dt = time.perf_counter() - (t0 or time.perf_counter())
    return {"images_per_s": done / dt if dt > 0 else 0.0, "data_wait_frac": wait / dt if dt > 0 else 0.0,
            "images": done, "seconds": dt}


def stream_batches(torch, size: int, classes_per_batch: int, dry: bool, workdir: str, decode_device: str = "cpu",
                   device=None, n_steps: int | None = None):
    """Synthetic JPEG shards -> the project's Ray Data stream -> (images, labels) tensors.

    ``decode_device``: ``cpu`` (the stream's actors decode; rows carry pixels) or ``cuda`` (rows
    carry JPEG bytes, decoded here on ``device`` by the train loop's own ``decode_batch``; on a
    dry run the same path decodes on the CPU). ``n_steps``: the stream's length in steps
    (default ~20 passes over the shards); read a stream to its end, so that Ray Data stops its
    iterator threads."""
    import ray

    from pipeline.config import load_config
    from pipeline.data.layouts import synthetic_classes
    from pipeline.data.shards import write_shards
    from pipeline.data.planner_actor import create_planner
    from pipeline.data.stream import build_train_datasets, stream_shape

    n_cls, per = (40, 8) if dry else (400, 20)
    if not os.path.exists(os.path.join(workdir, "manifest.json")):
        write_shards(synthetic_classes(n_cls, per, image_size=size, seed=0), workdir, holdout_fraction=0.0,
                     shard_size=200 if dry else 1000, progress=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    from pipeline.runtime import init_ray

    init_ray(max(8, os.cpu_count() or 1))  # local (loopback only) unless RAY_ADDRESS is set
    steps = n_steps or 20 * n_cls * per // (2 * classes_per_batch)  # default ~20 passes
    cfg = load_config(None, [f"data.train={workdir}/train", f"data.image_size={size}", "scaling.num_workers=1",
                             f"batch.classes_per_batch={classes_per_batch}", f"train.steps={steps}",
                             f"data.decode_concurrency={2 if dry else max(2, (os.cpu_count() or 2) - 2)}"])
    name = f"gpu-bench-planner-{size}-{decode_device}"
    planner = create_planner(name, workdir, classes_per_batch, 2, 1, 0, max_lead=stream_shape(cfg)[1])
    ray.get(planner.begin.remote(0, None))
    ds = build_train_datasets(cfg, name, 0, raw=decode_device == "cuda")["train_0"]
    it = ds.iter_torch_batches(batch_size=1, prefetch_batches=4, pin_memory=not dry)

    def batches(keep=planner):  # the generator holds the planner's handle: the actor lives as long
        from pipeline.train.loop import step_images

        for b in it:
            keep.done.remote(int(b["step"][0]), 0)  # what the train loop does after each step
            labels = b["labels"][0]
            yield step_images(b, size, device or torch.device("cpu"), labels.to(device or "cpu"), keep), labels

    return batches()


def faiss_mining(dry: bool) -> dict:
    """Index build (a refresh's swap) and greedy selection for C classes at d = 512."""
    import faiss
    import numpy as np

    from pipeline.mining.class_index import ClassEmbeddingIndex

    c, d = (20_000, 64) if dry else (1_000_000, 512)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((c, d), dtype=np.float32)
    idx = ClassEmbeddingIndex(d)
    t = time.perf_counter()
    idx.update(np.arange(c, dtype=np.int64), emb)
    build_s = time.perf_counter() - t
    pool = rng.choice(c, size=min(c, 100_000), replace=False)
    t = time.perf_counter()
    sel = idx.select(pool.tolist(), 192, np.random.default_rng(1))
    select_s = time.perf_counter() - t
    assert len(set(sel)) == 192
    return {"classes": c, "dim": d, "gpus": faiss.get_num_gpus(), "build_s": build_s,
            "select_N192_pool100k_s": select_s}


def stop_ray_data_prefetchers(timeout_s: float = 10.0) -> int:
    """Stop the block-prefetcher threads that Ray Data (2.60) leaves running after an iterator
    is closed early, and wait for them; returns how many were stopped.

    ``iter_batches`` stops its ``WaitBlockPrefetcher`` only when a stream is read to its end
    (not in a ``finally``), and the thread keeps the prefetcher alive, so a closed stream's
    thread runs on. At ``ray.shutdown()`` it then calls into the shut-down core worker, which
    ends the process with code 1 ("The core worker has already been shutdown ... The process
    will exit"): the dry run failed that way about one time in three here.
    """
    import gc
    import threading

    from ray.data._internal.block_batching.util import WaitBlockPrefetcher

    stopped = [o for o in gc.get_objects() if isinstance(o, WaitBlockPrefetcher)]
    for pf in stopped:
        pf.stop()
    deadline = time.monotonic() + timeout_s
    for th in threading.enumerate():
        if th.name == "Prefetcher":
            th.join(max(0.0, deadline - time.monotonic()))
    return len(stopped)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model and sizes: checks the logic")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--batch", type=int, default=256, help="images per training step (N-pair: N = batch / 2)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    args = p.parse_args()
    dry = args.dry_run
    torch, device = check_env(dry)
    batch, steps = (8, 2) if dry else (args.batch, args.steps)
    t_start = time.time()
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"}
    peak = matmul_rate(torch, device, dry)
    res["matmul_flops"] = peak
    print(f"[gpu] {res['device']}: matmul {peak / 1e12:.1f} TFLOP/s", flush=True)
    ceilings = {}
    for name, size in (("resnet50", 224), ("resnet50", 112), ("iresnet50", 112)):
        model = build(name, torch, dry)
        if model is None:
            print(f"[gpu] {name} not available in pipeline.models, skipped", flush=True)
            continue
        r = train_rate(torch, device, model, 32 if dry else size, batch, steps, args.compile)
        # A dry run trains a tiny CNN on 32x32 images: an MFU from ResNet FLOPs would be meaningless.
        r["mfu"] = None if dry else r["images_per_s"] * FLOPS_PER_IMAGE[(name, size)] / peak
        ceilings[f"{name}@{size}"] = r
        mfu = "n/a (dry run)" if dry else f"{100 * r['mfu']:.1f}%"
        print(f"[gpu] synthetic {name}@{size}: {r['images_per_s']:.0f} img/s, MFU {mfu}", flush=True)
    res["synthetic"] = ceilings
    # The training step's options one at a time, ResNet-50 at 224 (bf16 + channels_last above).
    variants = {"fp32": {"precision": "fp32"}, "bf16_no_channels_last": {"precision": "bf16", "channels_last": False}}
    if not args.compile and not dry:  # torch.compile of even the tiny CNN costs ~20 s of CPU: not in a dry run
        variants["bf16_compile"] = {"precision": "bf16", "compile_": True}
    options = {}
    for label, kw in variants.items():
        kw = {"compile_": args.compile, **kw}
        if dry:
            kw["precision"] = "bf16" if kw["precision"] == "bf16" and torch.backends.mkldnn.is_available() else "fp32"
        r = train_rate(torch, device, build("resnet50", torch, dry), 32 if dry else 224, batch, steps, **kw)
        r["mfu"] = None if dry else r["images_per_s"] * FLOPS_PER_IMAGE[("resnet50", 224)] / peak
        options[label] = r
        print(f"[gpu] synthetic resnet50@224 {label}: {r['images_per_s']:.0f} img/s", flush=True)
    res["step_options"] = options
    with tempfile.TemporaryDirectory() as work:
        size = 32 if dry else 224
        ref = ceilings.get("resnet50@224", {}).get("images_per_s") or 1.0
        res["stream"] = {}
        for decode_device in ("cpu", "cuda"):
            # A stream of exactly the steps train_rate takes (+3 warm-up), then read to its end:
            # Ray Data stops its prefetcher threads only at a stream's end (stop_ray_data_prefetchers).
            batches = stream_batches(torch, size, batch // 2, dry, work, decode_device, device, n_steps=steps * 2 + 3)
            r = train_rate(torch, device, build("resnet50", torch, dry), size, batch, steps * 2, args.compile, batches)
            left = sum(1 for _ in batches)
            assert left == 0, f"the stream had {left} steps more than train_rate took"
            r["ratio_to_synthetic"] = r["images_per_s"] / ref
            res["stream"][f"decode_{decode_device}"] = r
            print(f"[gpu] stream resnet50@{size}, data.decode_device={decode_device}: {r['images_per_s']:.0f} img/s "
                  f"({100 * r['ratio_to_synthetic']:.0f}% of synthetic), data wait {100 * r['data_wait_frac']:.0f}% "
                  f"of step time", flush=True)
    res["mining"] = faiss_mining(dry)
    print(f"[gpu] FAISS {res['mining']['classes']} classes: build {res['mining']['build_s']:.2f}s, select N=192 "
          f"{res['mining']['select_N192_pool100k_s'] * 1e3:.0f} ms", flush=True)
    res["wall_s"] = time.time() - t_start
    import ray

    stop_ray_data_prefetchers()
    ray.shutdown()  # so no Ray log line lands after the final JSON line
    print(json.dumps({"bench": "gpu", "dry_run": dry, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
