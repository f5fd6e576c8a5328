"""Screenshots of a run's pages in the MLflow UI, taken with headless Chromium: what a user sees first.

    python bench/mlflow_screenshots.py [--tracking-uri sqlite:///mlflow.db] [--run-id ID] [--out bench/out/screens]

Starts ``mlflow server`` on 127.0.0.1 (a free port) over the store, opens the run's
overview, model metrics, system metrics and artifacts pages in ``chromium --headless``
(Debian's ``chromium`` package; nothing is downloaded) and writes one PNG per page, then
stops the server. Without ``--run-id`` the newest training run of experiment ``dml``.
Prints one JSON line: {"run_id", "pages": {name: png path}}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = {"overview": "", "model_metrics": "/model-metrics", "system_metrics": "/system-metrics",
         "artifacts": "/artifacts", "matches": "/artifacts/eval/retrieval/matches.png"}
"""Run page tabs, by the path MLflow 3's UI gives them."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _newest_run(uri: str, experiment: str) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"error: no experiment '{experiment}' in {uri}")
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
            if r.data.tags.get("dml.kind") != "comparison"]
    if not runs:
        sys.exit(f"error: experiment '{experiment}' has no training run")
    return exp.experiment_id, runs[0].info.run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    p.add_argument("--experiment", default="dml")
    p.add_argument("--run-id", default="")
    p.add_argument("--out", default="bench/out/screens")
    p.add_argument("--size", default="1440,2000", help="window width,height in pixels")
    p.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to render")
    args = p.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("error: no chromium on PATH (Debian: apt-get install chromium)")
    from mlflow.tracking import MlflowClient

    if args.run_id:
        exp_id = MlflowClient(args.tracking_uri).get_run(args.run_id).info.experiment_id
        run_id = args.run_id
    else:
        exp_id, run_id = _newest_run(args.tracking_uri, args.experiment)
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", args.tracking_uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pages = {}
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    sys.exit("error: mlflow server did not start")
                time.sleep(1)
        with tempfile.TemporaryDirectory() as profile:
            for name, tab in PAGES.items():
                png = out / f"{name}.png"
                url = f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{run_id}{tab}"
                subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--user-data-dir={profile}", f"--window-size={args.size}",
                                f"--virtual-time-budget={args.wait_ms}", f"--screenshot={png}", url],
                               capture_output=True, timeout=180)
                pages[name] = str(png)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps({"run_id": run_id, "pages": pages}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
