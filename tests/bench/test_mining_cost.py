"""bench/mining_cost.py: the roles CPU time is charged to, the sampler on a real busy process, the ratios."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.mining_cost import ROLES, CpuByRole, ratios, role_of


@pytest.mark.parametrize("title, role", [
    ("ray::RayTrainWorker._RayTrainWorker__execute.get_next", "trainers"),
    ("ray::MapWorker(MapBatches(FetchDecode)).submit", "stream"),
    ("ray::ReadRange", "stream"),
    ("ray::PlannerActor.slices", "planner"),
    ("ray::MinerActor.table", "miner"),
    ("ray::MapWorker(MapBatches(Embedder))", "refresher"),
    ("/work/.venv/bin/python -m jobs.train --config configs/quickstart.yaml", "driver"),
    ("/work/.venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node_id", "ray"),
    ("ray::_StatsActor", "ray"),
    ("/sbin/init", "other"),
])
def test_roles(title, role):
    assert role_of(title) == role


def test_the_sampler_charges_the_job_by_role_and_the_rest_to_other():
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n"
    outside = subprocess.Popen([sys.executable, "-c", spin.replace("1.5", "1.0"), "ray::MinerActor"])
    with CpuByRole(every_s=0.2) as cpu:
        job = subprocess.Popen([sys.executable, "-c", "import subprocess, sys\n"
                                f"subprocess.run([sys.executable, '-c', {spin!r}, 'ray::RayTrainWorker'])",
                                "jobs.train"])
        cpu.root = job.pid
        job.wait()
        outside.wait()
    # The job's grandchild spun 1.5 s of CPU as a "trainer"; the sampler sees all but what it did
    # after the last sample (<= 0.2 s). The process outside the job is "other", whatever its title.
    assert 1.2 <= cpu.seconds["trainers"] <= 1.7, cpu.seconds
    assert cpu.seconds["miner"] == 0 and cpu.seconds["other"] >= 0.7, cpu.seconds


def test_ratios_pair_each_arm_with_the_random_run_of_its_repetition():
    def row(rep, arm, t, thr, trainers, miner):
        return {"rep": rep, "arm": arm, "train_time_s": t, "median_images_per_s": thr,
                "cpu_s": dict.fromkeys(ROLES, 0.0) | {"trainers": trainers, "miner": miner}}
    rows = [row(0, "random", 100, 500, 150, 0), row(0, "ema", 110, 450, 160, 5),
            row(1, "random", 200, 250, 150, 0), row(1, "ema", 210, 240, 150, 3)]
    s = ratios(rows)["ema"]
    assert s["train_time_ratios"] == pytest.approx([1.10, 1.05])
    assert s["train_time_ratio"] == pytest.approx(1.075)
    assert s["throughput_ratio"] == pytest.approx((0.9 + 0.96) / 2)
    assert s["cpu_ratio"] == pytest.approx((165 / 150 + 153 / 150) / 2)
    assert s["extra_cpu_s"] == dict.fromkeys(ROLES, 0.0) | {"trainers": 5.0, "miner": 4.0}
