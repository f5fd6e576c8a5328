"""What an install gets: declared dependencies cover the imports, the package list, shipped configs, console scripts,
and one clear line when FAISS is missing.

The fresh-virtualenv install with the README's line is ``tests/e2e/test_install.py``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMPORT_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "faiss": "faiss-cpu"}
"""Import names whose distribution is named otherwise."""
USED_BY_DEPENDENCIES = {"psutil": "MLflow's system metrics", "nvidia-ml-py": "MLflow's GPU system metrics (pynvml)"}
"""Declared distributions that the package does not import itself: a dependency uses them."""


def _dist(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].strip().lower()


def _third_party_imports() -> set[str]:
    found = set()
    for top in ("pipeline", "jobs"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("pipeline", "jobs")}


def test_every_import_of_the_package_is_a_declared_dependency():
    base = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    cpu = {_dist(r) for r in PYPROJECT["project"]["optional-dependencies"]["cpu"]}
    missing = sorted(m for m in _third_party_imports() if IMPORT_TO_DIST.get(m, m).lower() not in base | cpu)
    assert missing == []
    # FAISS is the one import left to an extra (CPU or GPU build), and the GPU extra has its GPU build.
    assert {IMPORT_TO_DIST.get(m, m).lower() for m in _third_party_imports()} - base == {"faiss-cpu"}
    assert [_dist(r) for r in PYPROJECT["project"]["optional-dependencies"]["gpu"]] == ["faiss-gpu", "nvidia-ml-py"]
    # Nothing declared that the package never imports (webdataset is for the tests: [dev]), but what MLflow uses.
    imported = {IMPORT_TO_DIST.get(m, m).lower() for m in _third_party_imports()}
    assert base - imported == set(USED_BY_DEPENDENCIES) & base == {"psutil"}


def test_requires_python_covers_what_the_code_uses():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert "hashlib.file_digest" in (ROOT / "pipeline/train/checkpoint.py").read_text()  # new in 3.11


def test_package_list_holds_every_package_folder_and_the_configs():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for top in ("pipeline", "jobs")
               for p in (ROOT / top).rglob("__init__.py")}
    assert listed == folders | {"pipeline.configs"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"pipeline.configs": "configs"}


def test_console_scripts_point_at_job_mains():
    import importlib

    scripts = PYPROJECT["project"]["scripts"]
    assert {"dml-train", "dml-shards", "dml-evaluate", "dml-compare", "dml-embed", "dml-search"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("name", ["quickstart", "quickstart.yaml", "configs/quickstart_mining.yaml"])
def test_config_names_resolve_from_the_shipped_configs(name, tmp_path, monkeypatch):
    from pipeline.config import find_config, load_config

    monkeypatch.chdir(tmp_path)  # no configs/ here
    path = find_config(name)
    assert path.is_file() and path.parent.name == "configs" and path.stem == Path(name).stem.split(".")[0]
    assert load_config(name).model.backbone == "small"


def test_an_unknown_config_names_the_shipped_ones(tmp_path, monkeypatch):
    from pipeline.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file 'quikstart' does not exist \(shipped configs.*quickstart,"):
        load_config("quikstart")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("elsewhere/quickstart.yaml")  # a path that is not the configs folder is not guessed


BLOCK_FAISS = "import sys, runpy; sys.modules['faiss'] = None; sys.argv = {argv!r}; runpy.run_module({mod!r}, run_name='__main__')"


@pytest.mark.parametrize("job", ["jobs.train", "jobs.evaluate"])
def test_missing_faiss_is_one_line_naming_the_extra(job, tmp_path):
    argv = [job, "--config", "quickstart"] if job == "jobs.train" else [job, "--run-id", "x"]
    p = subprocess.run([sys.executable, "-c", BLOCK_FAISS.format(argv=argv, mod=job)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: FAISS is not installed"), p.stderr
    assert 'pip install ".[cpu]"' in lines[0] and 'pip install ".[gpu]"' in lines[0]
    assert "Traceback" not in p.stderr + p.stdout and not (tmp_path / "mlflow.db").exists()


def test_importing_faiss_users_without_faiss_names_the_extra():
    code = ("import sys; sys.modules['faiss'] = None\n"
            "try:\n    import pipeline.eval.retrieval\nexcept ImportError as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("MissingDependencyError FAISS is not installed") and '".[cpu]"' in out
