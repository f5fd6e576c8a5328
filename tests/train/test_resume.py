"""pipeline.train.checkpoint.latest_checkpoint / resume_point when Ray Train's run snapshot was lost or cut, and tracking.open_run."""

from __future__ import annotations

import torch

from pipeline.train.checkpoint import CKPT_FILE, SNAPSHOT_FILE, CheckpointError, latest_checkpoint, resume_point, \
    save_checkpoint


def _checkpoint(run_dir, name, step):
    d = run_dir / name
    d.mkdir(parents=True)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(str(d), model, torch.optim.SGD(model.parameters(), lr=0.1), step, "run-a")
    return d


def test_a_cut_snapshot_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    run = tmp_path / "ft"
    _checkpoint(run, "checkpoint_2026-01-01_00-00-01", 10)
    _checkpoint(run, "checkpoint_2026-01-01_00-00-02", 20)
    cut = _checkpoint(run, "checkpoint_2026-01-01_00-00-03", 30)
    data = (cut / CKPT_FILE).read_bytes()
    (cut / CKPT_FILE).write_bytes(data[:100])  # killed while copying model.pt
    (run / SNAPSHOT_FILE).write_text("")  # killed while Ray rewrote its snapshot (seen after SIGTERM)

    # Read-only by default: a running job's controller rereads its snapshot on a restart.
    assert latest_checkpoint(str(tmp_path), "ft")["step"] == 20 and (run / SNAPSHOT_FILE).exists()
    got = latest_checkpoint(str(tmp_path), "ft", repair=True)
    assert got["step"] == 20 and got["run_id"] == "run-a" and not got["registered"]
    assert got["path"] == str(run / "checkpoint_2026-01-01_00-00-02")
    assert not (run / SNAPSHOT_FILE).exists()  # moved aside, or Ray Train would refuse to start
    assert [p.name.split(".unreadable-")[0] for p in run.glob("*.unreadable-*")] == [SNAPSHOT_FILE]
    assert "unreadable" in caplog.text


def test_no_run_folder_or_no_complete_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path), "none") is None
    d = _checkpoint(tmp_path / "ft", "checkpoint_x", 5)
    (d / "meta.json").unlink()
    assert latest_checkpoint(str(tmp_path), "ft") is None


def test_open_run_reopens_the_checkpoint_run_or_refuses_a_finished_one(tmp_path, capsys):
    import pytest
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.config import dump_yaml, load_config

    base = [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.run_name=ft"]
    cfg = load_config(None, base + ["train.steps=6"])
    uri, first = tracking.start_run(cfg, dump_yaml(cfg))
    tracking.end_run(uri, first, "KILLED")
    d = tmp_path / "runs" / "ft" / "checkpoint_1"
    d.mkdir(parents=True)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(str(d), model, torch.optim.SGD(model.parameters(), lr=0.1), 6, first)

    with pytest.raises(CheckpointError, match="already reached step 6 of train.steps=6"):
        resume_point(str(tmp_path / "runs"), "ft", cfg.train.steps)
    more = load_config(None, base + ["train.steps=10"])
    latest = resume_point(str(tmp_path / "runs"), "ft", more.train.steps)
    uri, run_id = tracking.open_run(more, dump_yaml(more), "ft", latest)
    assert run_id == first and latest["step"] == 6 and latest["path"] == str(d) and not latest["registered"]
    assert f"[train] resuming run {first} (ft) from step 6" in capsys.readouterr().out
    run = MlflowClient(tracking_uri=uri).get_run(first)
    assert run.info.status == "RUNNING" and run.data.tags["resumed_from_step"] == "6"
    # Another name starts a new run.
    other = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.run_name=new"])
    assert resume_point(str(tmp_path / "runs"), "new", other.train.steps) is None
    assert tracking.open_run(other, dump_yaml(other), "new", None)[1] != first
