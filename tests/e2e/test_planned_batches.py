"""End to end: jobs.train with 4 DDP workers (and the shared 2-worker quickstart run) trains every planned global batch whole.

From the sample ledger (``train.sample_ledger``: every rank's steps, sample ids, labels,
pass) and an in-process BatchPlanner with the run's arguments (the reference): at every
step the ranks' classes are disjoint and their union is the planned global batch, every
rank trains the same steps, and over the first (complete) pass every sample is trained at
most once and the ones never trained are exactly the planner's leftovers of that pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import QS_STEPS

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
STEPS, M = 25, 2


@pytest.mark.parametrize("workers", [4])
def test_every_step_trains_the_planned_global_batch(workers, tiny_shards, tmp_path):
    """4 ranks here; the shared quickstart run (2 ranks) is checked the same way below."""
    n = 2 * workers  # N classes per global batch: 2 per rank
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/quickstart.yaml"),
           f"data.train={tiny_shards}/train", "data.eval=", f"train.steps={STEPS}", "train.log_every=25",
           f"batch.classes_per_batch={n}", f"scaling.num_workers={workers}", "scaling.cpus_per_worker=0.5",
           "data.decode_concurrency=1", "train.seed=5", f"train.sample_ledger={tmp_path / 'ledger'}"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    json.loads(p.stdout.strip().splitlines()[-1])
    assert_planned(tmp_path / "ledger", tiny_shards, n, workers, seed=5, steps=STEPS)


def test_the_shared_quickstart_run_trains_every_planned_global_batch(quickstart_run, tiny_shards):
    """The 2-rank case, on the run that test_quickstart.py inspects (N = 4, seed 0): no Ray Train run of its own."""
    work, _ = quickstart_run
    assert_planned(work / "ledger", tiny_shards, n=4, workers=2, seed=0, steps=QS_STEPS)


def assert_planned(ledger: Path, shards: Path, n: int, workers: int, seed: int, steps: int) -> None:
    """The ledger of a run with ``n`` classes per step over ``workers`` ranks against an
    in-process BatchPlanner with the run's arguments (see the module docstring)."""
    from pipeline.data.index import class_ranges, load_index
    from pipeline.data.planner import BatchPlanner
    from pipeline.train.ledger import audit

    out = audit(ledger)
    assert out["steps_per_rank"] == {r: list(range(1, steps + 1)) for r in range(workers)}
    assert out["duplicates"] == {}
    ids, starts, counts = class_ranges(load_index(str(shards), "train"))
    ref = BatchPlanner(ids, starts, counts, classes_per_batch=n, images_per_class=M, world_size=workers, seed=seed,
                       max_lead=steps)
    by_step: dict[int, dict[int, dict]] = {}
    for line in out["kept"]:
        by_step.setdefault(line["step"], {})[line["rank"]] = line
    pass0: list[int] = []
    for step in range(1, steps + 1):
        plan = ref.plan(step - 1)
        ranks = [by_step[step][r] for r in range(workers)]
        classes = [set(r["labels"]) for r in ranks]
        assert all(len(c) == n // workers for c in classes)
        assert len(set().union(*classes)) == n, f"step {step}: the ranks' classes overlap"
        union = [i for r in ranks for i in r["sample_ids"]]
        assert union == plan.sample_ids.tolist() and [c for r in ranks for c in r["labels"]] == plan.labels.tolist()
        if plan.pass_index == 0:
            pass0 += union
    assert ref.pass_index >= 1, "the run must finish its first pass"
    total = int(counts.sum())
    assert len(pass0) == len(set(pass0)) == total - ref.unused[0]
    assert ref.unused[0] < n * M * 4  # leftovers are what a last step could not fill, a few batches at most
