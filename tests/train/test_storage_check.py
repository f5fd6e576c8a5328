"""``train.storage_path`` on a real two-node Ray cluster whose worker node does not see part of the disk.

The head and the worker node are ``ray start --block`` processes on loopback
(``cluster/loopback_ray_start.py``, as ``cluster/local.sh`` starts them, with a token of their own).
The worker node runs in a mount namespace of its own (``unshare -m``) with an empty tmpfs
mounted over ``<tmp>/private``: a directory the driver can write that the other node cannot
see, as a local disk on a real cluster. ``jobs.train`` with ``train.storage_path`` there
must stop before training with a clear error naming the node; a shared directory passes;
a relative path is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(token: Path, **extra: str) -> dict:
    """This process's environment with this cluster's token auth and no other Ray address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _client_env(nodes: dict) -> dict:
    # Keep 127.0.0.1 as 127.0.0.1 in the driver (see cluster/loopback_ray_start.py).
    return _ray_env(nodes["token"], RAY_ADDRESS=nodes["gcs"], RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                    PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (root or user namespaces) to give the worker node a private directory")
    work = tmp_path_factory.mktemp("storage")
    (work / "private").mkdir()
    (work / "shared").mkdir()
    temp = Path(f"/tmp/rst-{os.getpid()}")  # Ray's socket paths must stay short
    port = _free_port()
    start = [sys.executable, str(ROOT / "cluster" / "loopback_ray_start.py"), "start", "--block",
             "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
             "--object-store-memory=100000000"]
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _ray_env(token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5", RAY_agent_register_timeout_ms="120000",
                   RAY_worker_register_timeout_seconds="120")
    logs = {name: open(work / f"{name}.log", "w") for name in ("head", "worker")}
    head = subprocess.Popen(start + ["--head", f"--port={port}", f"--temp-dir={temp}/h", "--include-dashboard=false"],
                            env=env, stdout=logs["head"], stderr=subprocess.STDOUT, start_new_session=True)
    nodes = [head]
    try:
        _wait_log(work / "head.log", head)
        worker_cmd = " ".join(start + [f"--address=127.0.0.1:{port}", f"--temp-dir={temp}/w"])
        worker = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs dml-private {work / 'private'} && exec {worker_cmd}"],
            env=env, stdout=logs["worker"], stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append(worker)
        _wait_log(work / "worker.log", worker)
        yield {"work": work, "gcs": f"127.0.0.1:{port}", "token": token}
    finally:
        for proc in reversed(nodes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in logs.values():
            f.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_log(path: Path, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in path.read_text():
        assert proc.poll() is None, f"node exited:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"node did not start:\n{path.read_text()[-3000:]}"
        time.sleep(0.5)


def test_a_directory_one_node_cannot_see_stops_the_job_before_training(two_nodes, tiny_shards):
    work = two_nodes["work"]
    p = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs/quickstart.yaml"),
         f"data.train={tiny_shards}/train", "data.eval=", "data.image_size=32", "train.steps=2",
         "batch.classes_per_batch=4", "miner.pool_classes=8", f"train.storage_path={work / 'private' / 'runs'}",
         f"tracking.uri=sqlite:///{work / 'mlflow.db'}"],
        cwd=work, env=_client_env(two_nodes), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-4000:]
    assert f"train.storage_path '{work / 'private' / 'runs'}' is not shared by all nodes" in p.stderr
    assert "127.0.0.1 (" in p.stderr.split("is not shared by all nodes:")[1]  # the node, by address and id
    assert "[train] step" not in p.stdout + p.stderr
    assert not (work / "mlflow.db").exists()  # stopped before an MLflow run was opened
    assert not [f for f in (work / "private" / "runs").iterdir()]  # the marker is cleaned up


def test_shared_relative_and_uri_paths(two_nodes):
    work = two_nodes["work"]
    script = f"""
import json, ray
from pipeline.runtime import StorageError, check_storage
ray.init()
out = {{"nodes": len([n for n in ray.nodes() if n["Alive"]])}}
check_storage({str(work / 'shared' / 'runs')!r})
out["shared"] = "ok"
check_storage("s3://bucket/runs")  # a URI is every node's to reach; not checked
out["uri"] = "ok"
try:
    check_storage("runs")
except StorageError as e:
    out["relative"] = str(e)
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=work, env=_client_env(two_nodes),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 2 and out["shared"] == "ok" and out["uri"] == "ok"
    assert out["relative"].startswith("train.storage_path 'runs' is a relative path on a 2-node cluster")
    assert [f.name for f in (work / "shared" / "runs").iterdir()] == []
