"""pipeline.tracking: URI resolution, metric names, and a run's life cycle on a real SQLite store."""

from __future__ import annotations

import pytest

from pipeline import tracking
from pipeline.config import dump_yaml, load_config


def test_resolve_uri_order(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert tracking.resolve_uri("") == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_uri("") == "http://127.0.0.1:5000"
    assert tracking.resolve_uri("sqlite:////x.db") == "sqlite:////x.db"


def test_default_store_is_refused_inside_a_ray_job(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ValueError, match="tracking.uri"):
        tracking.resolve_uri("")


@pytest.mark.parametrize("name,expected", [("recall@1", "recall_at_1"), ("tar@far=1e-03", "tar_at_far_1e-03"),
                                           ("map@r", "map_at_r"), ("train/loss", "train/loss")])
def test_metric_names_are_mlflow_legal(name, expected):
    assert tracking.metric_name(name) == expected


def test_run_life_cycle(monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DML_GIT_COMMIT", "abc1234")
    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "tracking.experiment=t",
                             f"data.train={tmp_path}/ds/train", "loss.name=triplet"])
    uri, run_id = tracking.start_run(cfg, dump_yaml(cfg))
    tracking.log_metrics(uri, run_id, {"recall@1": 0.5, "nmi": 0.25}, step=7)
    tracking.end_run(uri, run_id, "KILLED")
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["git_commit"] == "abc1234" and run.data.tags["loss"] == "triplet"
    assert run.data.tags["dataset"] == "ds" and run.data.tags["mining"] == "off"
    assert run.data.params["loss.name"] == "triplet" and run.data.params["train.steps"] == "100"
    assert run.data.metrics == {"recall_at_1": 0.5, "nmi": 0.25}
    # Artifacts go next to the SQLite file, not into the working directory.
    assert MlflowClient(tracking_uri=uri).get_experiment(run.info.experiment_id).artifact_location.startswith(
        (tmp_path / "mlartifacts").as_uri())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _MlflowServer:
    """A real ``mlflow server`` on a loopback port that the test can stop and start again (same store)."""

    def __init__(self, root) -> None:
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.proc = None

    def start(self, timeout_s: float = 120.0) -> None:
        import subprocess
        import sys
        import time
        import urllib.request
        from pathlib import Path

        mlflow = Path(sys.executable).parent / "mlflow"
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} did not come up")

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
            self.proc.wait(timeout=60)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = _MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_metrics_survive_a_tracking_server_outage(mlflow_server, monkeypatch, capfd):
    """Server stopped mid-run: adds and flushes never block or raise, the outage is reported
    once, and every metric arrives with its step once the server is back."""
    import time

    from mlflow.tracking import MlflowClient

    for k in tracking.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(None, [f"tracking.uri={mlflow_server.uri}", "tracking.experiment=outage"])
    uri, run_id = tracking.start_run(cfg, dump_yaml(cfg))
    buf = tracking.MetricBuffer(uri, run_id)
    for step in range(1, 4):
        buf.add(step, {"train/loss": 10.0 - step})
    assert buf.flush(wait_s=60) and buf.sent == 3

    mlflow_server.stop()
    slowest = 0.0
    for step in range(4, 14):
        t0 = time.monotonic()
        buf.add(step, {"train/loss": 10.0 - step, "train/images_per_s": 100.0 * step})
        buf.flush()
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.05)
    assert slowest < 0.5, f"a flush blocked the training step for {slowest:.2f}s"
    assert not buf.flush(wait_s=60)
    assert buf.failing and buf.outages == 1 and len(buf.rows) == 20

    mlflow_server.start()
    buf.add(14, {"train/loss": -4.0})
    assert buf.close(timeout_s=60) == 0
    assert buf.sent == 3 + 20 + 1 and not buf.failing
    tracking.end_run(uri, run_id, "FINISHED", retry_s=30)

    client = MlflowClient(tracking_uri=uri)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert loss == [(s, 10.0 - s) for s in range(1, 15)]
    ips = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/images_per_s"))
    assert ips == [(s, 100.0 * s) for s in range(4, 14)]
    assert client.get_run(run_id).info.status == "FINISHED"
    err = capfd.readouterr().err
    assert err.count("is unreachable") == 1, err
    assert err.count("reachable again") == 1, err


def test_end_run_retries_until_the_server_is_back(mlflow_server, monkeypatch):
    """The run never stays RUNNING because the server was briefly down when the job ended."""
    import threading
    import time

    from mlflow.tracking import MlflowClient

    for k in tracking.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(None, [f"tracking.uri={mlflow_server.uri}", "tracking.experiment=outage",
                             "train.run_name=again"])
    uri, run_id = tracking.start_run(cfg, dump_yaml(cfg))
    mlflow_server.stop()
    restart = threading.Timer(3.0, mlflow_server.start)
    restart.start()
    t0 = time.monotonic()
    tracking.end_run(uri, run_id, "KILLED", retry_s=120)
    restart.join()
    assert time.monotonic() - t0 >= 3.0
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "KILLED"
    # A killed run is found again by its name and reopened; a FINISHED one is not.
    assert tracking.find_run(uri, "outage", "again") == run_id
    tracking.resume_run(uri, run_id, "x: 1\n", step=40)
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["resumed_from_step"] == "40"
    tracking.end_run(uri, run_id, "FINISHED")
    assert tracking.find_run(uri, "outage", "again") is None
    assert tracking.find_run(uri, "outage", "other") is None


def test_end_run_gives_up_after_retry_s(monkeypatch):
    """Nothing listens: the error comes back after about retry_s, not MLflow's minutes of retries."""
    import time

    from mlflow.exceptions import MlflowException

    for k in tracking.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    t0 = time.monotonic()
    with pytest.raises(MlflowException):
        tracking.end_run(f"http://127.0.0.1:{_free_port()}", "0" * 32, "FAILED", retry_s=3)
    assert time.monotonic() - t0 < 20


class _LosingProxy:
    """A loopback TCP proxy in front of a real server that forwards every request but swallows
    the answers to the first ``drops`` requests whose first bytes contain ``marker``, closing
    that connection instead: the request took effect, the client never hears of it (what a
    read timeout against a slow server looks like to the client)."""

    def __init__(self, target_port: int, marker: bytes, drops: int = 1) -> None:
        import socket
        import threading

        self.target_port, self.marker, self.drops, self.dropped = target_port, marker, drops, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"swallow": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client, server, state) -> None:
        try:
            while data := client.recv(65536):
                # HTTP/1.1 without pipelining: a new request starts only after the last answer arrived.
                with self.lock:
                    if self.marker in data and self.dropped < self.drops:
                        self.dropped += 1
                        state["swallow"] = True
                server.sendall(data)
        except OSError:
            pass

    def _down(self, server, client, state) -> None:
        try:
            while data := server.recv(65536):
                if state["swallow"]:
                    break
                client.sendall(data)
        except OSError:
            pass
        for s in (client, server):
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def test_a_run_created_whose_answer_was_lost_is_not_created_twice(mlflow_server, monkeypatch, capfd):
    """The server makes the run but its answer never arrives (a read timeout on a loaded machine):
    start_run retries and finds that run by its start token instead of making a second one."""
    from mlflow.tracking import MlflowClient

    for k in tracking.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    proxy = _LosingProxy(mlflow_server.port, b"/runs/create")
    try:
        cfg = load_config(None, [f"tracking.uri={proxy.uri}", "tracking.experiment=lossy", "tracking.retry_s=60"])
        uri, run_id = tracking.start_run(cfg, dump_yaml(cfg))
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert "creating a run" in capfd.readouterr().err  # the one retry was announced
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("lossy")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].data.params["tracking.experiment"] == "lossy"
    assert runs[0].data.tags[tracking.START_TOKEN_TAG]
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml"}


def test_a_job_started_while_the_server_is_down_waits_for_it(mlflow_server, monkeypatch):
    """open_run (what the driver calls first) retries for tracking.retry_s instead of failing the job."""
    import threading

    from mlflow.tracking import MlflowClient

    for k in tracking.HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    mlflow_server.stop()
    restart = threading.Timer(3.0, mlflow_server.start)
    restart.start()
    cfg = load_config(None, [f"tracking.uri={mlflow_server.uri}", "tracking.experiment=late",
                             "train.run_name=late", "tracking.retry_s=120"])
    uri, run_id = tracking.open_run(cfg, dump_yaml(cfg), "late", None)
    restart.join()
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "late"
    with pytest.raises(LookupError, match="not found"):
        tracking.get_run(uri, "0" * 32)
