"""End to end on a real two-node Ray cluster on this machine (``cluster/local.sh``).

One cluster for the module: head + worker node on loopback with token authentication, and an
MLflow tracking server (``cluster/mlflow_server.sh``). The quickstart is submitted with
``ray job submit`` as README.md shows; its run must land in the tracking server with
per-step metrics and the checkpoint artifact. Submissions without the cluster's token must be
rejected, and every server of the cluster must listen on loopback only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.sockets import is_loopback, listening, listening_of, session_pids

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
MLFLOW_SH = ROOT / "cluster" / "mlflow_server.sh"
RAY = Path(sys.executable).parent / "ray"
STEPS = 4
# local.sh uses ports BASE..BASE+299; the MLflow server gets BASE+300.
CANDIDATE_BASES = (27379, 28379, 29379, 30379)


def _pick_base() -> int:
    busy = {port for _, port, _ in listening()}
    for base in CANDIDATE_BASES:
        if not busy & set(range(base, base + 301)):
            return base
    pytest.skip(f"no free port block for the test cluster among {CANDIDATE_BASES}")


def _run(cmd, env, timeout, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _parse_exports(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(.*)$", text, flags=re.M))


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address or token, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The running cluster: ``{"env": client env, "dashboard": url, "mlflow": uri, ...}``."""
    base = _pick_base()
    state = tmp_path_factory.mktemp("cluster")
    ray_temp = Path(f"/tmp/ray-test-{os.getpid()}")  # short: Ray's socket paths must stay < 108 chars
    env = _clean_env(DML_CLUSTER_STATE=str(state / "ray"), DML_CLUSTER_TEMP=str(ray_temp),
                     DML_CLUSTER_PORT=str(base), DML_MLFLOW_STATE=str(state / "mlflow"),
                     DML_MLFLOW_PORT=str(base + 300))
    # The tracking server starts while the nodes do: both take most of a minute on 2 busy cores.
    mlflow = subprocess.Popen([str(MLFLOW_SH), "start"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        up = _run([LOCAL_SH, "up"], env, timeout=400)
        mlflow_out = mlflow.communicate(timeout=300)[0]
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout}\n{up.stderr}"
        assert mlflow.returncode == 0, f"mlflow_server.sh start failed:\n{mlflow_out}"
        client = _parse_exports(_run([LOCAL_SH, "env"], env, timeout=30).stdout)
        assert client["RAY_AUTH_MODE"] == "token"
        yield {
            "env": env,
            "client_env": _clean_env(**client),
            "dashboard": client["RAY_ADDRESS"],
            "token": Path(client["RAY_AUTH_TOKEN_PATH"]),
            "mlflow": f"http://127.0.0.1:{base + 300}",
            "ports": (base, base + 1),
            "state": state,
        }
    finally:
        if mlflow.poll() is None:
            mlflow.wait(timeout=300)
        down = _run([LOCAL_SH, "down"], env, timeout=120)
        _run([MLFLOW_SH, "stop"], env, timeout=60)
        shutil.rmtree(ray_temp, ignore_errors=True)
        assert down.returncode == 0, down.stderr


def test_up_starts_two_nodes_and_is_idempotent(cluster):
    st = _run([LOCAL_SH, "status"], cluster["env"], timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    assert "nodes alive: 2" in st.stdout
    again = _run([LOCAL_SH, "up"], cluster["env"], timeout=60)
    assert again.returncode == 0 and "already running" in again.stderr
    # a second cluster on the same ports is refused before anything starts
    other = dict(cluster["env"], DML_CLUSTER_STATE=str(cluster["state"] / "other"))
    clash = _run([LOCAL_SH, "up"], other, timeout=60)
    assert clash.returncode == 1 and "in use" in clash.stderr, clash.stderr
    token = cluster["token"]
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) == 64


def test_quickstart_job_runs_on_the_cluster_and_lands_in_mlflow(cluster, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient

    shards = tmp_path / "shards"
    mk = _run([sys.executable, "-m", "jobs.make_shards", "--layout", "synthetic", "--num-classes", "40",
               "--images-per-class", "8", "--image-size", "32", "--shard-size", "40", "--out", shards],
              _clean_env(), timeout=300)
    assert mk.returncode == 0, mk.stderr
    runs = tmp_path / "runs"
    sub_id = f"test-{uuid.uuid4().hex[:8]}"
    job = _run([RAY, "job", "submit", "--submission-id", sub_id, "--runtime-env", "cluster/runtime_env.yaml",
                "--working-dir", ".", "--",
                "python", "-m", "jobs.train", "--config", "configs/quickstart.yaml",
                f"data.train={shards}/train", f"data.eval={shards}/holdout", "data.image_size=32",
                f"train.steps={STEPS}", "train.log_every=1", "batch.classes_per_batch=4", "miner.pool_classes=8",
                "model.backbone=tiny", f"tracking.uri={cluster['mlflow']}", f"train.storage_path={runs}",
                "train.run_name=cluster-e2e"],
               cluster["client_env"], timeout=900)
    log = job.stdout + job.stderr
    assert job.returncode == 0, f"ray job submit failed ({job.returncode}):\n{log[-8000:]}"
    assert f"Job '{sub_id}' succeeded" in log
    final = [json.loads(m) for m in re.findall(r'^(\{"run_id".*\})\s*$', log, flags=re.M)]
    assert final, f"no final JSON line from jobs.train:\n{log[-4000:]}"
    run_id = final[-1]["run_id"]
    assert 0.0 <= final[-1]["metrics"]["recall@1"] <= 1.0

    client = MlflowClient(tracking_uri=cluster["mlflow"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(h.step for h in history) == list(range(1, STEPS + 1))
    arts = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert "checkpoint/model.pt" in arts
    ckpt = client.download_artifacts(run_id, "checkpoint/model.pt", str(tmp_path))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == STEPS and state["run_id"] == run_id
    assert list(runs.glob("cluster-e2e/checkpoint_*")), "no Ray Train checkpoint under train.storage_path"


def test_submissions_without_the_token_are_rejected(cluster, tmp_path):
    dashboard = cluster["dashboard"]
    marker = f"rejected-{uuid.uuid4().hex[:8]}"
    home = tmp_path / "home"  # no ~/.ray/auth_token to fall back on
    home.mkdir()
    no_token = _clean_env(HOME=str(home), RAY_ADDRESS=dashboard)
    p = _run([RAY, "job", "submit", "--no-wait", "--", "echo", marker], no_token, timeout=120, cwd=tmp_path)
    assert p.returncode != 0 and "Unauthorized" in p.stdout + p.stderr, p.stdout + p.stderr

    wrong = _clean_env(HOME=str(home), RAY_ADDRESS=dashboard, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    p = _run([RAY, "job", "submit", "--no-wait", "--", "echo", marker], wrong, timeout=120, cwd=tmp_path)
    assert p.returncode != 0 and "Forbidden" in p.stdout + p.stderr, p.stdout + p.stderr

    def get(headers):
        req = urllib.request.Request(f"{dashboard}/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, None

    assert get({})[0] == 401
    assert get({"Authorization": "Bearer " + "0" * 64})[0] == 403
    status, jobs = get({"Authorization": "Bearer " + cluster["token"].read_text().strip()})
    assert status == 200
    assert not [j for j in jobs if marker in (j.get("entrypoint") or "")], "a rejected submission was accepted"


def _cluster_pids(state: Path) -> set[int]:
    """Every process of the two nodes: each node's `ray start` is a session leader (setsid)."""
    return session_pids({int((state / "ray" / f"{n}.pid").read_text()) for n in ("head", "worker")})


def test_every_cluster_server_listens_on_loopback_only(cluster):
    pids = _cluster_pids(cluster["state"])
    assert len(pids) > 5, "expected the GCS, raylets, dashboard, agents and workers"
    ours = [(addr, port) for addr, port, _ in listening_of(pids)]
    gcs, dashboard = cluster["ports"]
    assert {gcs, dashboard} <= {port for _, port in ours}, ours
    exposed = sorted({(a, p) for a, p in ours if not is_loopback(a)})
    assert not exposed, f"cluster ports bound beyond loopback: {exposed}"
    mlflow_port = int(cluster["mlflow"].rsplit(":", 1)[1])
    mlflow_binds = {a for a, p, _ in listening() if p == mlflow_port}
    assert mlflow_binds and all(is_loopback(a) for a in mlflow_binds), mlflow_binds
