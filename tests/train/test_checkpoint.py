"""pipeline.train.checkpoint: contents, weights_only loading, RNG round trip, partial checkpoints refused."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipeline.train.checkpoint import (CKPT_FILE, META_FILE, CheckpointError, load_checkpoint_dir, read_meta,
                                       rng_state, save_checkpoint, set_rng_state)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip(tmp_path):
    model, opt = _model_and_optimizer()
    planner = {"step": 12, "pass": 1, "cursors": torch.tensor([5, 1, 9, 2**40]), "bad": torch.zeros(0, dtype=torch.int64)}
    save_checkpoint(str(tmp_path), model, opt, step=12, run_id="r" * 32, planner_state=planner, world_size=2)
    meta = read_meta(str(tmp_path))
    assert meta["step"] == 12 and meta["run_id"] == "r" * 32
    assert meta["bytes"] == (tmp_path / CKPT_FILE).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [META_FILE, CKPT_FILE]  # no temporary files left

    # Plain torch.load(weights_only=True) reads it: tensors and plain types only.
    state = torch.load(tmp_path / CKPT_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 12 and state["world_size"] == 2 and state["scheduler"] is None
    assert state["planner"]["pass"] == 1 and state["planner"]["cursors"].tolist() == [5, 1, 9, 2**40]
    assert "consumed_ids" not in state
    fresh, fresh_opt = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)), None
    fresh.load_state_dict(state["model"])
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fresh_opt.load_state_dict(state["optimizer"])
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_states_round_trip(tmp_path):
    model, opt = _model_and_optimizer()
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    save_checkpoint(str(tmp_path), model, opt, step=1, run_id="x")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(load_checkpoint_dir(str(tmp_path))["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    # A gaussian cached by numpy survives too.
    np.random.seed(1)
    np.random.standard_normal()
    state = rng_state()
    a = np.random.standard_normal(2)
    set_rng_state(state)
    assert np.array_equal(np.random.standard_normal(2), a)


def test_partial_checkpoints_are_refused(tmp_path):
    model, opt = _model_and_optimizer()
    save_checkpoint(str(tmp_path), model, opt, step=3, run_id="x")
    data = (tmp_path / CKPT_FILE).read_bytes()

    (tmp_path / CKPT_FILE).write_bytes(data[: len(data) // 2])  # cut off mid-copy
    with pytest.raises(CheckpointError, match="partial or altered"):
        load_checkpoint_dir(str(tmp_path))

    (tmp_path / CKPT_FILE).write_bytes(data)
    assert load_checkpoint_dir(str(tmp_path))["step"] == 3
    (tmp_path / META_FILE).unlink()  # meta.json is written last: its absence means an unfinished write
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint_dir(str(tmp_path))

    (tmp_path / META_FILE).write_text(json.dumps({"step": 4, "run_id": "x", "file": CKPT_FILE,
                                                  "bytes": len(data), "sha256": "0" * 64}))
    with pytest.raises(CheckpointError):
        load_checkpoint_dir(str(tmp_path))
