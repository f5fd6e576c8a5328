"""The one short quickstart run that several e2e modules inspect (a Ray Train run costs ~50 s here).

test_quickstart.py (metrics, MLflow, evaluations during training, jobs.evaluate), test_use_model.py
(the logged model, jobs.embed / jobs.search), test_learning.py (it learns) and test_planned_batches.py
(its sample ledger: every planned global batch trained whole, 2 ranks) all read it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.jobs import run_job

QS_STEPS = 100
"""Steps of the shared run: enough to learn (test_learning.py), ~5 s more than 6 steps."""
QS_EVERY = 25
"""Its log and evaluation interval: train/loss and held-out Recall@1 at steps 25, 50, 75, 100."""
REGISTERED = "e2e-faces"
"""The model registry name the shared run registers its model under."""


@pytest.fixture(scope="session")
def quickstart_run(tiny_shards, tmp_path_factory):
    """``jobs.train --config configs/quickstart.yaml`` on the tiny shards (32 px, N = 4, 2 workers,
    QS_STEPS steps, seed 0), registered as REGISTERED: ``(work dir, final JSON line)``."""
    work = tmp_path_factory.mktemp("qs")
    out = run_job(["jobs.train", "--config", str(Path(__file__).parents[2] / "configs/quickstart.yaml"),
                   f"data.train={tiny_shards}/train", f"data.eval={tiny_shards}/holdout", "data.image_size=32",
                   f"train.steps={QS_STEPS}", f"train.log_every={QS_EVERY}", f"eval.every={QS_EVERY}",
                   "batch.classes_per_batch=4", f"tracking.register_model={REGISTERED}", "train.run_name=e2e",
                   f"train.sample_ledger={work / 'ledger'}"],  # test_planned_batches.py audits it
                  cwd=work, timeout=900)  # under load average 50+ here a 600 s limit was not enough
    return work, out
