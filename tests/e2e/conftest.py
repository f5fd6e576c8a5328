"""The one short quickstart run that several e2e modules inspect (a Ray Train run costs ~50 s here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.jobs import run_job

QS_STEPS = 6
"""Steps of the shared quickstart run (evaluated every 2: at steps 2, 4 and 6)."""
REGISTERED = "e2e-faces"
"""The model registry name the shared run registers its model under."""


@pytest.fixture(scope="session")
def quickstart_run(tiny_shards, tmp_path_factory):
    """``jobs.train --config configs/quickstart.yaml`` on the tiny shards: ``(work dir, final JSON line)``."""
    work = tmp_path_factory.mktemp("qs")
    out = run_job(["jobs.train", "--config", str(Path(__file__).parents[2] / "configs/quickstart.yaml"),
                   f"data.train={tiny_shards}/train", f"data.eval={tiny_shards}/holdout", "data.image_size=32",
                   f"train.steps={QS_STEPS}", "train.log_every=2", "eval.every=2", "batch.classes_per_batch=4",
                   f"tracking.register_model={REGISTERED}", "train.run_name=e2e"], cwd=work)
    return work, out
