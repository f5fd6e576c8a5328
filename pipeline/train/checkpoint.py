"""Training checkpoints: what a resumed run needs, written so that a partial one is never loaded.

A checkpoint directory holds ``model.pt`` (one ``torch.save`` dict of tensors and plain
types, loadable with ``torch.load(weights_only=True)``) and ``meta.json``:

- ``model.pt``: ``model`` and ``optimizer`` state dicts, ``scheduler`` (None: the project
  has no LR schedule yet; the key is kept so one can be added without a format change),
  ``step`` (optimizer steps done), ``run_id`` (the MLflow run), ``rng`` (torch, CUDA,
  numpy and Python generator states of rank 0), ``planner`` (the batch planner's state as
  of ``step``: pass, per-class cursors, seeds, bad ids, as tensors and ints; the data
  position, O(classes): ~85 KB at CASIA-WebFace's 10.5k classes, at most ~16 MB at
  WebFace42M's 2M, whatever the step or pass; see ``pipeline.data.planner``) and
  ``world_size``. No per-sample list: the model and optimizer dominate.
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
import logging
import os
import random
import time

import numpy as np
import torch

CKPT_FILE = "model.pt"
META_FILE = "meta.json"

log = logging.getLogger("pipeline.train")


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
                    planner_state: dict | None = None, world_size: int = 1, scheduler=None) -> str:
    """Write ``model.pt`` and then ``meta.json`` into ``directory`` (see the module docstring).

    ``model`` is the unwrapped module (no DDP ``module.`` prefixes). Returns the path of ``model.pt``.
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "step": int(step),
        "run_id": run_id,
        "rng": rng_state(),
        "planner": planner_state,
        "world_size": int(world_size),
    }
    path = os.path.join(directory, CKPT_FILE)
    _write_atomic(path, lambda p: torch.save(state, p))
    meta = {"step": int(step), "run_id": run_id, "file": CKPT_FILE, "bytes": os.path.getsize(path),
            "sha256": _sha256(path)}
    _write_atomic(os.path.join(directory, META_FILE), lambda p: _write_text(p, json.dumps(meta)))
    return path


def load_checkpoint(path: str) -> dict:
    """Load a ``model.pt`` written by :func:`save_checkpoint` (tensors and plain types only, ``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_meta(directory: str, fs=None) -> dict:
    """The ``meta.json`` of a checkpoint directory, local or on a pyarrow filesystem ``fs``.

    Raises CheckpointError when it is missing or unreadable.
    """
    import pyarrow

    path = f"{directory.rstrip('/')}/{META_FILE}"
    try:
        if fs is None:
            with open(path) as f:
                return json.load(f)
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError, pyarrow.ArrowException) as e:
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


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's (V2) list of registered checkpoints in ``<storage_path>/<run name>/``."""


def latest_checkpoint(storage_path: str, name: str, repair: bool = False) -> dict | None:
    """The checkpoint a job of run ``name`` resumes from: its ``meta.json``, plus ``path`` and ``registered``.

    Normally the latest checkpoint in Ray Train's run snapshot (``registered`` True; Ray
    hands it to the workers itself). Ray writes that snapshot in place, so a job killed at
    the wrong moment leaves it empty or cut (seen here after SIGTERM: a 0-byte file), and
    Ray Train would then refuse to start. Then, or when there is no snapshot at all, the
    newest checkpoint directory whose ``meta.json`` is readable and whose ``model.pt`` has
    the size it records is used (``registered`` False: the driver passes it to the loop).
    With ``repair`` an unreadable snapshot is moved aside (``<name>.unreadable-<time>``) so
    that Ray Train can start; only a driver about to run ``name`` may do that (a running
    job's controller rereads the snapshot when it restarts its worker group). Returns None
    when the run has no complete checkpoint. Raises CheckpointError when the registered
    latest checkpoint has no readable ``meta.json`` (an older format).
    """
    import pyarrow.fs

    from pipeline.runtime import is_uri

    fs, exp = pyarrow.fs.FileSystem.from_uri(storage_path.rstrip("/") + "/" + name)
    scheme = storage_path.split("://", 1)[0] + "://" if is_uri(storage_path) else ""
    snapshot = f"{exp}/{SNAPSHOT_FILE}"
    if fs.get_file_info(snapshot).type == pyarrow.fs.FileType.File:
        try:
            ckpt = _registered_checkpoint(scheme + exp)
        except Exception as e:  # noqa: BLE001 -- whatever Ray makes of a cut snapshot
            if not repair:
                return _newest_complete(fs, exp, scheme)
            aside = f"{snapshot}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            fs.move(snapshot, aside)
            log.warning("Ray Train's run snapshot %s%s is unreadable (%s: %s); moved it to %s and resuming from "
                        "the newest complete checkpoint directory", scheme, snapshot, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "", aside)
        else:
            if ckpt is None:
                return None
            try:
                meta = read_meta(ckpt.path, ckpt.filesystem)
            except CheckpointError:
                raise CheckpointError(f"the latest checkpoint of run '{name}' ({ckpt.path}) has no readable "
                                      f"{META_FILE}: it was written by an older version of this project; use a new "
                                      f"train.run_name") from None
            return dict(meta, path=scheme + ckpt.path, registered=True)
    return _newest_complete(fs, exp, scheme)


def resume_point(storage_path: str, run_name: str, steps: int) -> dict | None:
    """The checkpoint a job named ``run_name`` resumes from (see :func:`latest_checkpoint`), or None.

    None without a ``run_name`` (a generated name never resumes). Raises CheckpointError
    when that checkpoint already reached ``steps`` (``train.steps``).
    """
    if not run_name:
        return None
    latest = latest_checkpoint(storage_path, run_name, repair=True)
    if latest is not None and int(latest["step"]) >= steps:
        raise CheckpointError(f"run '{run_name}' (MLflow run {latest['run_id']}) already reached step "
                              f"{latest['step']} of train.steps={steps} in {storage_path}: raise train.steps to "
                              f"train on, or pick a new train.run_name")
    return latest


def _newest_complete(fs, exp: str, scheme: str) -> dict | None:
    import pyarrow.fs

    best = None
    if fs.get_file_info(exp).type != pyarrow.fs.FileType.Directory:
        return None
    for info in fs.get_file_info(pyarrow.fs.FileSelector(exp)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            meta = read_meta(info.path, fs)
        except CheckpointError:
            continue  # not fully written
        if fs.get_file_info(f"{info.path}/{meta.get('file', CKPT_FILE)}").size != meta.get("bytes"):
            continue
        if best is None or meta["step"] > best["step"]:
            best = dict(meta, path=scheme + info.path, registered=False)
    return best


def _registered_checkpoint(exp: str):
    import ray.train

    # Reading the snapshot logs Ray's "A run snapshot was found..." advice, meant for fit().
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(exp).checkpoint
    finally:
        quiet.setLevel(level)
