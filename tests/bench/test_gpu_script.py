"""bench/gpu.py: the no-GPU error path and a CPU dry run of its logic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench/gpu.py"


def test_without_gpu_it_exits_2_with_a_clear_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "no CUDA GPU" in p.stderr and "--dry-run" in p.stderr
    assert p.stdout.strip() == ""


@pytest.mark.e2e
def test_dry_run_measures_every_stage_on_cpu():
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"stdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-3000:]}"
    res = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    assert res["dry_run"] is True and res["matmul_flops"] > 1e8
    assert set(res["synthetic"]) >= {"resnet50@224", "resnet50@112"}
    assert all(r["images_per_s"] > 0 and r["images"] == 16 for r in res["synthetic"].values())
    assert set(res["stream"]) == {"decode_cpu", "decode_cuda"}  # data.decode_device's two paths (CPU decode here)
    for r in res["stream"].values():
        assert r["images"] > 0 and 0.0 <= r["data_wait_frac"] < 1.0
    assert set(res["step_options"]) == {"fp32", "bf16_no_channels_last"}  # + bf16_compile on a GPU
    assert all(r["images_per_s"] > 0 for r in res["step_options"].values())
    assert res["mining"]["classes"] == 20000 and res["mining"]["build_s"] > 0
