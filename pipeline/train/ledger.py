"""The sample ledger (``train.sample_ledger``): a debugging/audit aid for resumed runs.

With a directory set, every rank appends one JSON line per trained step to
``rank<r>-pid<pid>.jsonl`` there: ``{"rank", "pid", "attempt", "started", "resumed_from",
"step", "pass", "sample_ids", "labels"}`` (``pass``: the planner's pass the step's samples come from) (``labels[i]`` is the class of ``sample_ids[i]``, so a
run's batches can be audited from the ledger alone: which classes each rank trained together). An attempt is one start of the worker group (the first, then each
restart): ``attempt`` is a token rank 0 draws and broadcasts at start, ``started`` rank 0's
wall clock then, ``resumed_from`` the checkpoint step it started from (0 = fresh).
A line is written once the step's optimizer update is done, so a worker killed mid-step
leaves no line for it. This is the one place where ranks other than 0 write files: it
must record what each rank trained, including the rank that dies.

:func:`audit` replays the ledger as the run's history: a later attempt that resumed from
step S redid every step after S, so the earlier attempts' lines for steps > S are
discarded. What remains is what the final model was trained on.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path


class SampleLedger:
    """Appends this rank's trained steps to its ledger file (line-buffered: a killed process loses no finished line)."""

    def __init__(self, directory: str, rank: int, attempt: str, started: float, resumed_from: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self.rank, self.pid, self.resumed_from = rank, os.getpid(), resumed_from
        self.attempt, self.started = attempt, started
        self.path = os.path.join(directory, f"rank{rank}-pid{self.pid}.jsonl")
        self._f = open(self.path, "a", buffering=1)

    def write(self, step: int, sample_ids, labels=(), pass_index: int = 0) -> None:
        """Record that this rank trained ``step`` on ``sample_ids`` of classes ``labels`` (sequences of ints)."""
        self._f.write(json.dumps({"rank": self.rank, "pid": self.pid, "attempt": self.attempt,
                                  "started": self.started, "resumed_from": self.resumed_from, "step": step, "pass": int(pass_index), "sample_ids": [int(i) for i in sample_ids],
                                  "labels": [int(c) for c in labels]}) + "\n")

    def close(self) -> None:
        self._f.close()


def read_ledger(directory: str | Path) -> list[dict]:
    """All ledger lines of ``directory``; ``attempt`` is replaced by its index (0, 1, ... in order of start).

    A torn last line (the writer was killed while writing it) is skipped.
    """
    lines = []
    for path in sorted(Path(directory).glob("rank*-pid*.jsonl")):
        for text in path.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
    order = sorted({(r["started"], r["attempt"]) for r in lines})
    index = {token: i for i, (_, token) in enumerate(order)}
    for r in lines:
        r["attempt"] = index[r["attempt"]]
    return lines


def audit(directory: str | Path) -> dict:
    """Replay the ledger: which lines count, and whether any sample was trained twice in one pass.

    Returns ``{"kept": [lines], "discarded": [lines], "steps_per_rank": {rank: sorted steps},
    "samples": n kept ids, "unique": n distinct kept (pass, id) pairs, "duplicates": {(pass, id): count > 1},
    "attempts": [{"attempt", "resumed_from", "steps": (first, last), "lines"}]}``.
    """
    rows = read_ledger(directory)
    resumes = sorted({(r["attempt"], r["resumed_from"]) for r in rows})
    kept, discarded = [], []
    for r in rows:
        # Redone later: a later attempt resumed from a checkpoint before this step.
        redone = any(a > r["attempt"] and start < r["step"] for a, start in resumes)
        (discarded if redone else kept).append(r)
    steps: dict[int, list[int]] = {}
    for r in kept:
        steps.setdefault(r["rank"], []).append(r["step"])
    ids = Counter((r.get("pass", 0), i) for r in kept for i in r["sample_ids"])
    attempts = []
    for a, start in resumes:
        mine = [r["step"] for r in rows if r["attempt"] == a]
        attempts.append({"attempt": a, "resumed_from": start, "steps": (min(mine), max(mine)), "lines": len(mine)})
    return {
        "kept": kept,
        "discarded": discarded,
        "steps_per_rank": {k: sorted(v) for k, v in sorted(steps.items())},
        "samples": sum(ids.values()),
        "unique": len(ids),
        "duplicates": {i: c for i, c in ids.items() if c > 1},
        "attempts": attempts,
    }
