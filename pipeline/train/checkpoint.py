"""Training checkpoints: what a resumed run needs, written so that a partial one is never loaded.

A checkpoint directory holds ``model.pt`` (one ``torch.save`` dict of tensors and plain
types, loadable with ``torch.load(weights_only=True)``) and ``meta.json``:

- ``model.pt``: ``model`` and ``optimizer`` state dicts, ``scheduler`` (None: the project
  has no LR schedule yet; the key is kept so one can be added without a format change),
  ``step`` (optimizer steps done), ``run_id`` (the MLflow run), ``rng`` (torch, CUDA,
  numpy and Python generator states of rank 0), ``consumed_ids`` (int64 tensor: the
  ``sample_ids`` of every batch trained so far, on all ranks: the data position) and
  ``world_size``.
- ``meta.json``: step, run id, and the size and SHA-256 of ``model.pt``, written last.

Both files are written to temporary names and renamed, ``meta.json`` after ``model.pt``.
Ray Train (V2) then copies the directory to ``train.storage_path`` and registers it only
once the copy is complete; ``ray.train.get_checkpoint()`` returns only registered ones. A
checkpoint without ``meta.json``, or whose ``model.pt`` does not match it, is refused by
:func:`load_checkpoint_dir` with :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch

CKPT_FILE = "model.pt"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or does not match its ``meta.json``."""


def rng_state() -> dict:
    """This process's torch, CUDA, numpy and Python generator states, as tensors and plain types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore the generator states returned by :func:`rng_state` (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer, step: int, run_id: str,
                    consumed_ids: np.ndarray | None = None, world_size: int = 1, scheduler=None) -> str:
    """Write ``model.pt`` and then ``meta.json`` into ``directory`` (see the module docstring).

    ``model`` is the unwrapped module (no DDP ``module.`` prefixes). Returns the path of ``model.pt``.
    """
    consumed = np.zeros(0, dtype=np.int64) if consumed_ids is None else np.asarray(consumed_ids, dtype=np.int64)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "step": int(step),
        "run_id": run_id,
        "rng": rng_state(),
        "consumed_ids": torch.from_numpy(consumed.copy()),
        "world_size": int(world_size),
    }
    path = os.path.join(directory, CKPT_FILE)
    _write_atomic(path, lambda p: torch.save(state, p))
    meta = {"step": int(step), "run_id": run_id, "file": CKPT_FILE, "bytes": os.path.getsize(path),
            "sha256": _sha256(path), "consumed": int(consumed.size)}
    _write_atomic(os.path.join(directory, META_FILE), lambda p: _write_text(p, json.dumps(meta)))
    return path


def load_checkpoint(path: str) -> dict:
    """Load a ``model.pt`` written by :func:`save_checkpoint` (tensors and plain types only, ``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_meta(directory: str) -> dict:
    """The ``meta.json`` of a checkpoint directory; raises CheckpointError when it is missing or unreadable."""
    path = os.path.join(directory, META_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{directory}' is incomplete: no readable {META_FILE} ({e}); "
                              f"it was not fully written and must not be resumed from") from None


def load_checkpoint_dir(directory: str) -> dict:
    """Load the checkpoint in ``directory`` after checking ``model.pt`` against ``meta.json``.

    Returns the ``model.pt`` dict. Raises CheckpointError for a partial or altered checkpoint.
    """
    meta = read_meta(directory)
    path = os.path.join(directory, meta.get("file", CKPT_FILE))
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size != meta["bytes"] or _sha256(path) != meta["sha256"]:
        raise CheckpointError(f"checkpoint '{directory}': {os.path.basename(path)} has {size} bytes and does not "
                              f"match {META_FILE} ({meta['bytes']} bytes, sha256 {meta['sha256'][:12]}...): "
                              f"partial or altered, refusing to resume from it")
    state = load_checkpoint(path)
    if state["step"] != meta["step"] or state["run_id"] != meta["run_id"]:
        raise CheckpointError(f"checkpoint '{directory}': {CKPT_FILE} (step {state['step']}) does not match "
                              f"{META_FILE} (step {meta['step']})")
    return state
