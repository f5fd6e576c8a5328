"""A fresh virtualenv installed with the README's line, ``pip install ".[cpu]"``, run from outside the checkout.

What is real: a new venv, pip building this project's wheel in its isolated build
environment (setuptools from the package index) and installing it (not editable) with its
console scripts and shipped configs, every ``pipeline`` module imported
from that install, ``dml-compare`` on a real MLflow store, ``dml-train --config quickstart``
resolving the shipped config. What is borrowed, to keep it to about 30 s and to keep torch's
~1 GB wheel off the network: the dependencies (torch, Ray, MLflow, FAISS, matplotlib, ...) are the test
environment's own, seen by the new venv through one ``.pth`` line, so pip finds them
installed instead of downloading them; ``tests/test_packaging.py`` checks that each of
them is declared.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _readme_install_line() -> str:
    m = re.search(r"^pip install \"\.\[cpu\]\".*$", (ROOT / "README.md").read_text(), re.M)
    assert m, "README.md gives no `pip install \".[cpu]\"` line"
    return m.group(0).split("#")[0].strip()


def test_fresh_venv_with_the_readme_install_line(tmp_path):
    from mlflow.tracking import MlflowClient

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin/python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    line = _readme_install_line()
    assert line == 'pip install ".[cpu]"'
    # From a copy of the tracked files: the build must not write build/ into the checkout.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    p = subprocess.run([str(venv / "bin/pip"), "install", "--disable-pip-version-check",
                        "-q", ".[cpu]"], cwd=src, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    away = tmp_path / "away"  # no checkout on the path: everything comes from the install
    away.mkdir()
    code = ("import importlib, json, pathlib, pkgutil, pipeline, jobs\n"
            "names = [m.name for pkg in (pipeline, jobs) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "print(json.dumps({'file': pipeline.__file__, 'modules': names}))")
    r = subprocess.run([str(py), "-c", code], cwd=away, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(site)
    want = {".".join(f.relative_to(ROOT).with_suffix("").parts) for top in ("pipeline", "jobs")
            for f in (ROOT / top).rglob("*.py") if f.name != "__init__.py"}
    assert want <= set(info["modules"])

    for script in ("dml-train", "dml-shards", "dml-evaluate", "dml-compare", "dml-embed", "dml-search"):
        assert (venv / "bin" / script).is_file(), script
    cfg = subprocess.run([str(venv / "bin/dml-train"), "--config", "quickstart", "--print-config"], cwd=away,
                         capture_output=True, text=True, timeout=120)
    assert cfg.returncode == 0 and "backbone: small" in cfg.stdout, cfg.stderr[-2000:]

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("dml", artifact_location=(tmp_path / "arts").as_uri())
    for i in range(2):
        run = client.create_run(exp, run_name=f"r{i}")
        client.log_param(run.info.run_id, "loss.name", ["npair_mc", "triplet"][i])
        for step in range(1, 4):
            client.log_metric(run.info.run_id, "train/loss", 1.0 / step + i, step=step)
        client.log_metric(run.info.run_id, "recall_at_1", 0.3 + 0.1 * i)
        client.set_terminated(run.info.run_id)
    c = subprocess.run([str(venv / "bin/dml-compare"), "--tracking-uri", uri, "--out", str(tmp_path / "cmp")],
                       cwd=away, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    assert json.loads(c.stdout.strip().splitlines()[-1])["out"] == str(tmp_path / "cmp")
    assert {"comparison.md", "loss_curves.png", "recall_at_k.png"} <= {f.name for f in (tmp_path / "cmp").iterdir()}
    header = (tmp_path / "cmp/comparison.md").read_text().splitlines()[0]
    assert "loss.name" in header and "recall_at_1" in header
