"""The cluster configs that cannot run here (AWS `ray up`, KubeRay RayJob): parse them and check
the fields that make them secure and make them run this project's training job."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
CLUSTER = ROOT / "cluster"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _strings(node) -> list[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


WILDCARD = re.compile(r"(?<![\d.])0\.0\.0\.0(?![\d.])|\[::\]|--(dashboard-)?host[= ]::(\s|$)")


@pytest.mark.parametrize("name", ["aws.yaml", "kuberay/rayjob.yaml", "runtime_env.yaml"])
def test_no_wildcard_binds(name):
    text = "\n".join(_strings(_load(name)))
    assert not WILDCARD.search(text), f"{name} binds all interfaces: {WILDCARD.search(text).group(0)}"


def test_aws_cluster_uses_token_auth_private_binds_and_shared_storage():
    cfg = _load("aws.yaml")
    head, workers = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    for cmds in (head, workers):
        start = [c for c in cmds if "ray start" in c]
        assert start, "no ray start command"
        assert all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in start), start
    head_start = next(c for c in head if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    mlflow = next(c for c in head if "mlflow_server.sh start" in c)
    assert "DML_MLFLOW_HOST=$PRIVATE_IP" in mlflow and "s3://" in mlflow
    # the token file travels with file_mounts, and is the one the start commands read
    token_dst = next(dst for dst, src in cfg["file_mounts"].items() if "auth_token" in src)
    assert Path(token_dst).name in head_start
    gpu = cfg["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert gpu.startswith(("g5.12", "g5.24", "g5.48", "p4d", "p4de", "p5", "g6.12", "g6.48")), gpu
    setup = " ".join(cfg["setup_commands"])
    assert '".[gpu]"' in setup and "constraints.txt" in setup
    assert "s3://" in (CLUSTER / "aws.yaml").read_text().split("train.storage_path=")[1].split()[0]
    excluded = set(cfg["rsync_exclude"])
    assert {".venv", "data", "runs", "mlartifacts", "*.db", "cluster/.local"} <= excluded


def test_kuberay_rayjob_runs_webface_npair_with_token_auth_on_gpus():
    job = _load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].split("&&")[-1].split()[:4] == [
        "python", "-m", "jobs.train", "--config"] and "configs/webface_npair.yaml" in spec["entrypoint"]
    assert "train.storage_path=s3://" in spec["entrypoint"]
    rc = spec["rayClusterSpec"]
    assert rc["authOptions"]["mode"] == "token"
    major, minor, *_ = (int(x) for x in rc["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "token auth needs Ray >= 2.52"
    assert rc["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "$POD_IP"
    head_env = {e["name"] for e in rc["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert "POD_IP" in head_env
    gpus = 0
    for group in rc["workerGroupSpecs"]:
        c = group["template"]["spec"]["containers"][0]
        gpus += group["replicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
    webface = ROOT / "configs" / "webface_npair.yaml"
    if webface.exists():  # the job's DDP workers must fit the GPUs
        assert gpus >= yaml.safe_load(webface.read_text())["scaling"]["num_workers"]


def test_runtime_env_excludes_what_must_not_be_uploaded():
    env = _load("runtime_env.yaml")
    assert {".venv/", "data/", "runs/", "mlartifacts/", "*.db"} <= set(env["excludes"])


@pytest.mark.parametrize("script", ["local.sh", "mlflow_server.sh"])
def test_scripts_parse_and_print_usage(script):
    path = CLUSTER / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    p = subprocess.run([str(path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "usage:" in p.stderr


def test_mlflow_server_refuses_wildcard_host(tmp_path):
    p = subprocess.run([str(CLUSTER / "mlflow_server.sh"), "start"], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "DML_MLFLOW_HOST": "0.0.0.0", "DML_MLFLOW_STATE": str(tmp_path)})
    assert p.returncode == 1 and "refusing to bind 0.0.0.0" in p.stderr
