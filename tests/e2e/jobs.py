"""Running the project's commands as a user does: ``python -m jobs.<name>`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_job(args: list[str], cwd: Path, timeout: int = 600) -> dict:
    """Run ``python -m <args>`` in ``cwd`` on a local Ray (``RAY_ADDRESS`` unset); returns its final JSON line.

    Fails the test with the tail of both streams when it exits non-zero.
    """
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])
