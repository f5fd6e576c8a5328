"""End-to-end fixtures shared across files: one short training run that several tests read."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.jobs import run_job

ROOT = Path(__file__).resolve().parents[2]
USE_STEPS = 100
"""Steps of the shared run: enough to learn (tests/e2e/test_learning.py), ~5 s more than 6 steps."""
REGISTERED = "e2e-faces"
"""The model-registry name the shared run registers its model under."""


@pytest.fixture(scope="session")
def use_run(tiny_shards, tmp_path_factory):
    """``jobs.train`` with ``configs/quickstart.yaml`` on the tiny shards (32 px, N = 4, 2 workers,
    USE_STEPS steps, seed 0), registered as REGISTERED. Returns ``(working dir, final JSON line)``."""
    work = tmp_path_factory.mktemp("use")
    out = run_job(["jobs.train", "--config", str(ROOT / "configs/quickstart.yaml"),
                   f"data.train={tiny_shards}/train", f"data.eval={tiny_shards}/holdout", "data.image_size=32",
                   f"train.steps={USE_STEPS}", "train.log_every=2", "batch.classes_per_batch=4",
                   f"tracking.register_model={REGISTERED}", "train.run_name=use"], cwd=work,
                  timeout=900)  # 100 steps: under load average 50+ here a 600 s limit was not enough
    return work, out
