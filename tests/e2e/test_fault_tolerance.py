"""End to end: a training worker killed mid-run, then the whole job stopped and rerun.

One scenario, run for real (``python -m jobs.train`` subprocesses, local Ray, 2 DDP workers,
MLflow in a SQLite file), observed through the sample ledger (``train.sample_ledger``):

1. The job starts with ``train.max_failures=1``. Once Ray Train has registered a checkpoint
   and rank 1 has trained a few steps past it, the test SIGKILLs that worker process. Ray
   Train restarts the worker group, which resumes from the latest registered checkpoint.
2. Once the restarted group has a registered checkpoint past its start and trained a few
   steps beyond, the test stops the whole job with SIGTERM (a preempted head, ``ray job
   stop``): its MLflow run ends KILLED, not RUNNING. Until then, about once a second, the
   test reads which TCP ports the job's processes listen on (its local Ray instance: GCS,
   raylet, agents, train and Ray Data workers, actors): loopback only.
3. The same command is run again: it resumes from the latest checkpoint, in the same MLflow
   run, and finishes.

Then the ledger, replayed (a later attempt's resume discards the earlier attempts' steps
after its checkpoint), must hold every step 1..STEPS once per rank, no sample twice in a
pass, and exactly the plans an uninterrupted in-process BatchPlanner makes (resume is
exact); the final checkpoint's planner state equals that planner's and holds no per-sample array.

"Registered": Ray Train (V2) counts a reported checkpoint only once its controller has
polled the report (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default); a worker
group lost before that resumes from the checkpoint before. Seen here: a kill 3 steps
(~0.2 s) after the first checkpoint restarted from step 0. So the test waits for the
checkpoint to appear in Ray Train's snapshot (``latest_checkpoint``), and polls at 0.5 s so
that reports every 10 steps do not wait on the controller (``report`` blocks while the
previous report is not yet polled).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.sockets import is_loopback, listening_of, session_pids

pytestmark = pytest.mark.e2e
STEPS = 120
EVERY = 10
PER_STEP = 4 * 2  # classes_per_batch x images_per_class: ids per global step
ROOT = Path(__file__).parents[2]


def _command(tiny_shards: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/quickstart.yaml"),
            f"data.train={tiny_shards}/train", "data.eval=", "data.image_size=32", f"train.steps={STEPS}",
            "train.log_every=50", f"train.checkpoint_every={EVERY}", "train.max_failures=1",
            "batch.classes_per_batch=4", "miner.pool_classes=8", "train.run_name=ft",
            f"train.storage_path={work / 'runs'}", f"train.sample_ledger={work / 'ledger'}"]


def _reference(shards: Path):
    """The uninterrupted planner of this run's data and config (seed 0, N=4, M=2, W=2)."""
    from pipeline.data.index import class_ranges, load_index
    from pipeline.data.planner import BatchPlanner

    ids, starts, counts = class_ranges(load_index(str(shards), "train"))
    return BatchPlanner(ids, starts, counts, classes_per_batch=4, images_per_class=2, world_size=2, seed=0,
                        max_lead=STEPS, rewind_window=STEPS)


def _env() -> dict:
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONPATH=str(ROOT), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    env.pop("RAY_ADDRESS", None)
    return env


def _ledger_steps(ledger: Path) -> dict[tuple[int, int], int]:
    """``(rank, pid) -> last step written`` of every ledger file."""
    out = {}
    for path in ledger.glob("rank*-pid*.jsonl"):
        rank, pid = (int(x) for x in path.stem[4:].split("-pid"))
        lines = path.read_text().splitlines()
        for text in reversed(lines):
            try:
                out[(rank, pid)] = json.loads(text)["step"]
                break
            except ValueError:
                continue
    return out


def _registered_step(work: Path) -> int:
    """Step of the latest checkpoint in Ray Train's snapshot of run ``ft`` (0: none yet)."""
    from pipeline.train.checkpoint import latest_checkpoint

    try:
        meta = latest_checkpoint(str(work / "runs"), "ft")
    except Exception:  # noqa: BLE001 -- the snapshot may be mid-write; ask again
        return 0
    return int(meta["step"]) if meta and meta["registered"] else 0


def _wait_for(pred, proc: subprocess.Popen, what: str, log: Path, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) while waiting for {what}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class _PortWatch(threading.Thread):
    """Adds to ``ports``, about once a second until stopped, the ``(address, port, process name)``
    that the processes of ``pid``'s session listen on. A thread: reading /proc for every process
    takes long enough under load to delay the kill and the SIGTERM past the end of the run."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.ports, self.stop = pid, set(), threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            self.ports |= set(listening_of(session_pids({self.pid})))


@pytest.fixture(scope="module")
def scenario(tiny_shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("ft")
    ledger = work / "ledger"
    log1 = open(work / "job1.log", "w")
    # Its own session: Ray's daemons (GCS, raylet) leave the job's process tree but stay in its session.
    job = subprocess.Popen(_command(tiny_shards, work), cwd=work, env=_env(), stdout=log1, stderr=subprocess.STDOUT,
                           start_new_session=True)
    watch = _PortWatch(job.pid)
    watch.start()
    try:
        # 1. SIGKILL rank 1 a few steps after a registered checkpoint.
        def rank1_past_a_registered_checkpoint():
            ckpt = _registered_step(work)
            past = [(pid, s) for (rank, pid), s in _ledger_steps(ledger).items() if rank == 1 and s >= ckpt + 3]
            return (ckpt, past[0]) if ckpt and past else None

        first_ckpt, (pid1, killed_at) = _wait_for(rank1_past_a_registered_checkpoint, job,
                                                  "rank 1 to pass a registered checkpoint", work / "job1.log")
        os.kill(pid1, signal.SIGKILL)

        # 2. SIGTERM the whole job once the restarted group is past a registered checkpoint of its own.
        def restarted_group_past_a_checkpoint():
            new = {k: s for k, s in _ledger_steps(ledger).items() if k[1] != pid1 and k[0] == 1}
            ckpt = _registered_step(work)
            return (ckpt, new) if new and ckpt > killed_at and min(new.values()) >= ckpt + 3 else None

        second_ckpt, _ = _wait_for(restarted_group_past_a_checkpoint, job,
                                   "the restarted worker group to pass a registered checkpoint", work / "job1.log")
        watch.stop.set()
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=180)
    finally:
        watch.stop.set()
        if job.poll() is None:
            job.kill()
            job.wait()
        log1.close()
    job1_log = (work / "job1.log").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    job1_runs = [(r.info.run_id, r.info.status)
                 for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]

    # 3. The same command again: resumes and finishes.
    job2 = subprocess.run(_command(tiny_shards, work), cwd=work, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert job2.returncode == 0, f"rerun failed ({job2.returncode}):\n{job2.stdout[-3000:]}\n{job2.stderr[-5000:]}"
    return {"work": work, "ledger": ledger, "shards": tiny_shards, "killed_pid": pid1, "killed_at": killed_at,
            "registered": (first_ckpt, second_ckpt), "job1_rc": job.returncode,
            "job1_log": job1_log, "job1_runs": job1_runs, "ports": watch.ports, "job2": job2,
            "result": json.loads(job2.stdout.strip().splitlines()[-1])}


def test_no_sample_twice_and_every_step_once(scenario):
    from pipeline.train.ledger import audit

    out = audit(scenario["ledger"])
    attempts = out["attempts"]
    # Three worker-group starts: the first, Ray Train's restart after the SIGKILL, the rerun.
    assert len(attempts) == 3, attempts
    first, restart, rerun = attempts
    assert first["resumed_from"] == 0 and first["steps"][0] == 1
    # Each start resumed from a checkpoint: a multiple of EVERY, no older than the one
    # registered when the test struck, and at or before the previous attempt's last step.
    for prev, cur, registered in ((first, restart, scenario["registered"][0]),
                                  (restart, rerun, scenario["registered"][1])):
        assert cur["resumed_from"] % EVERY == 0 and registered <= cur["resumed_from"] <= prev["steps"][1]
        assert cur["steps"][0] == cur["resumed_from"] + 1
    assert rerun["steps"][1] == STEPS
    assert out["steps_per_rank"] == {0: list(range(1, STEPS + 1)), 1: list(range(1, STEPS + 1))}
    assert out["duplicates"] == {}
    # Every slot of every kept step is a real sample, none twice in its pass (the 160
    # train samples make ~6 passes of 120 x 8).
    assert out["samples"] == out["unique"] == STEPS * PER_STEP
    # What was trained is exactly what an uninterrupted planner plans: rank r's line of
    # step s is slice r of plan s-1, whatever the kills (resume in O(classes) is exact).
    ref = _reference(scenario["shards"])
    for r in out["kept"]:
        part = ref.plan(r["step"] - 1).slice(r["rank"])
        assert r["sample_ids"] == part.sample_ids.tolist() and r["labels"] == part.labels.tolist(), r["step"]
        assert r["pass"] == ref.plan(r["step"] - 1).pass_index
    for r in out["discarded"]:  # a redone step was trained with the same batch both times
        assert r["sample_ids"] == ref.plan(r["step"] - 1).slice(r["rank"]).sample_ids.tolist()
    # The redone steps: what each earlier attempt trained after the checkpoint the next resumed from.
    redone = sum(prev["steps"][1] - cur["resumed_from"] for prev, cur in ((first, restart), (restart, rerun)))
    # Per rank, an attempt's discarded lines are exactly its steps after the checkpoint the next
    # attempt resumed from. A kill can stop one rank before it writes its line for the last step
    # the other rank wrote, so a rank may end one step short of its attempt's last step.
    for prev, cur in ((first, restart), (restart, rerun)):
        for rank in (0, 1):
            got = sorted(r["step"] for r in out["discarded"] if r["attempt"] == prev["attempt"] and r["rank"] == rank)
            assert got == list(range(cur["resumed_from"] + 1, cur["resumed_from"] + 1 + len(got))), (rank, got)
            assert prev["steps"][1] - 1 <= cur["resumed_from"] + len(got) <= prev["steps"][1], (rank, got, prev)
    print(f"\n[ledger] attempts {attempts}; kept {len(out['kept'])} lines / {out['samples']} samples; "
          f"discarded {len(out['discarded'])} lines ({redone} steps x 2 ranks), each redone with the same batch")


def test_final_checkpoint_holds_the_planner_state_in_o_classes(scenario, tiny_shards):
    import numpy as np

    from pipeline.train.checkpoint import load_checkpoint_dir

    ckpts = [c for c in (scenario["work"] / "runs" / "ft").glob("checkpoint_*") if c.is_dir()]
    state = max((load_checkpoint_dir(str(c)) for c in ckpts), key=lambda s: s["step"])
    assert state["step"] == STEPS and state["run_id"] == scenario["result"]["run_id"]
    assert "consumed_ids" not in state
    ref = _reference(tiny_shards)
    for s in range(STEPS):
        ref.plan(s)
    want = ref.state_dict(STEPS)
    got = state["planner"]
    assert set(got) == set(want)
    for k, v in want.items():
        g = got[k].numpy() if torch.is_tensor(got[k]) else got[k]
        assert np.array_equal(np.asarray(g), np.asarray(v)), k
        # O(classes): no array is as long as the samples (160 here, 20 classes)
        assert np.asarray(g).size <= 2 * ref.num_classes + 8, k
    # What the driver logged to MLflow is the same checkpoint, readable with weights_only.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{scenario['work'] / 'mlflow.db'}")
    path = client.download_artifacts(scenario["result"]["run_id"], "checkpoint/model.pt", str(scenario["work"]))
    art = torch.load(path, map_location="cpu", weights_only=True)
    assert art["step"] == STEPS and art["planner"].keys() == state["planner"].keys()


def test_sigterm_left_the_run_killed_then_the_rerun_resumed_it(scenario):
    """After the SIGTERM, before the rerun: one MLflow run, KILLED (not RUNNING); the rerun's is that run."""
    assert scenario["job1_runs"] == [(scenario["result"]["run_id"], "KILLED")], scenario["job1_log"][-3000:]
    # Ray's C++ signal handler may abort the process during teardown (-6) after the run is
    # closed; what matters is that the job stops with a failure code and the run is KILLED.
    assert scenario["job1_rc"] != 0


def test_the_local_ray_instance_listens_on_loopback_only(scenario):
    """What the job's processes listened on while they trained (read from /proc, as ``ss -ltnp``)."""
    ports = scenario["ports"]
    names = {name for _, _, name in ports}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), sorted(ports)
    exposed = sorted(p for p in ports if not is_loopback(p[0]))
    assert not exposed, f"the local Ray instance listens beyond loopback: {exposed}"


def test_one_mlflow_run_resumed_and_finished(scenario):
    from mlflow.tracking import MlflowClient

    work, run_id = scenario["work"], scenario["result"]["run_id"]
    assert scenario["job1_rc"] != 0, scenario["job1_log"][-3000:]
    assert "[train] resuming from the checkpoint of step" in scenario["job1_log"]  # Ray Train's restart
    assert f"[train] resuming run {run_id} (ft) from step" in scenario["job2"].stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    resumed = sorted(int(m.value) for m in client.get_metric_history(run_id, "train/resumed_from_step"))
    assert len(resumed) == 2 and resumed[-1] == int(run.data.tags["resumed_from_step"])
    steps = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    # One value per log interval (the mean) and at each checkpoint: none lost to the kill.
    assert steps == {s for s in range(1, STEPS + 1) if s % 50 == 0 or s % EVERY == 0 or s == STEPS}
