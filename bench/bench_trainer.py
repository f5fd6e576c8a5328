"""Trainer overhead: step time under Ray Train vs plain torchrun DDP, same model and batches.

    python bench/bench_trainer.py [--steps 60] [--workers 2] [--backbone tiny] [--batch 32] [--size 64]

Both run the identical per-rank loop (``run_steps``): the same small CNN + embedding head,
N-pair-mc loss, SGD, gloo DDP, batches generated in memory from fixed seeds (no data
loading, so the comparison isolates the trainer). The limit is torchrun; the ratio
Ray Train / torchrun of the median step time is the trainer's overhead (target <= 1.05).
Start-up (launch to first step) is reported separately. Prints one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_steps(steps: int, backbone: str, batch: int, size: int, report=None) -> dict:
    """The loop both launchers run on each rank (process group already initialised)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.config import ModelConfig, load_config
    from pipeline.losses import build_loss
    from pipeline.models import build_model
    from pipeline.train.step import MetricObjective, TrainStep, make_optimizer, make_scheduler

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(ModelConfig(backbone=backbone, embedding_dim=64)))
    # The project's own step (pipeline.train.step), as jobs.train runs it.
    cfg = load_config(None, ["train.lr=0.01", f"train.steps={steps}"])
    opt = make_optimizer(cfg, model)
    train_step = TrainStep(model, MetricObjective(build_loss("npair_mc", cross_rank=True)), opt,
                           make_scheduler(cfg, opt))
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    y = torch.arange(batch // 2).repeat_interleave(2) + rank * batch
    times, first = [], time.time()
    for _ in range(steps):
        t = time.perf_counter()
        train_step(x, y)
        times.append(time.perf_counter() - t)
        if report is not None:
            report(train_step)
    return {"median_step_s": statistics.median(times[5:]), "first_step_wall": first}


def _torchrun_worker(args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    res = run_steps(args.steps, args.backbone, args.batch, args.size)
    if dist.get_rank() == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(args.out + ".tmp", args.out)  # a complete file or none
    dist.barrier()
    dist.destroy_process_group()


def torchrun(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        with socket.socket() as sock:  # a free port: a fixed one can still be in TIME_WAIT
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.workers}",
                            "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--worker", "--out", out,
                            f"--steps={args.steps}", f"--backbone={args.backbone}", f"--batch={args.batch}",
                            f"--size={args.size}"], capture_output=True, text=True)
        if not os.path.exists(out):
            raise SystemExit(f"torchrun failed ({p.returncode}):\n{p.stderr[-3000:]}")
        if p.returncode != 0:
            # Seen here: a gloo rank aborts in teardown ("terminate called without an active
            # exception") after the timed steps and the result file are complete.
            print(f"warning: torchrun exited {p.returncode} after writing its result (teardown)", file=sys.stderr)
        res = json.load(open(out))
    res["startup_s"] = res.pop("first_step_wall") - t0
    return res


def _ray_loop(config: dict) -> None:
    import ray.train

    step = [0]

    def report(train_step) -> None:
        # As the project's loop does: every rank reports every log_every (10) steps, reading
        # the interval's mean loss then (the one host sync of the interval).
        step[0] += 1
        if step[0] % 10 == 0:
            ray.train.report({"loss": train_step.read()["train/loss"]})

    res = run_steps(config["steps"], config["backbone"], config["batch"], config["size"], report)
    # Ray Train V2 keeps metrics only with checkpoints; rank 0 writes its figures to a file
    # (a single machine) rather than faking a checkpoint.
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump(res, f)


def ray_train(args) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.runtime import init_ray

    init_ray(8)  # local, loopback only
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            _ray_loop,
            train_loop_config={"steps": args.steps, "backbone": args.backbone, "batch": args.batch, "size": args.size,
                               "out": os.path.join(tmp, "res.json")},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(storage_path=tmp, name="bench-trainer"),
        )
        trainer.fit()
        m = json.load(open(os.path.join(tmp, "res.json")))
    ray.shutdown()
    return {"median_step_s": m["median_step_s"], "startup_s": m["first_step_wall"] - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _torchrun_worker(args)
        return 0
    # Interleave the two launchers twice so drift in machine load hits both.
    tr, rt = [], []
    for _ in range(2):
        tr.append(torchrun(args))
        rt.append(ray_train(args))
    t_step = statistics.median(r["median_step_s"] for r in tr)
    r_step = statistics.median(r["median_step_s"] for r in rt)
    res = {"bench": "trainer", "workers": args.workers, "backbone": args.backbone, "batch_per_rank": args.batch,
           "size": args.size, "torchrun_step_s": t_step, "ray_train_step_s": r_step, "ratio_ray_to_torchrun": r_step / t_step,
           "torchrun_startup_s": statistics.median(r["startup_s"] for r in tr),
           "ray_train_startup_s": statistics.median(r["startup_s"] for r in rt), "load_avg_1m": os.getloadavg()[0]}
    print(f"step: Ray Train {1e3 * r_step:.1f} ms vs torchrun {1e3 * t_step:.1f} ms (ratio {res['ratio_ray_to_torchrun']:.3f}); "
          f"start-up: Ray Train {res['ray_train_startup_s']:.1f}s vs torchrun {res['torchrun_startup_s']:.1f}s")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
