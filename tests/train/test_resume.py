"""pipeline.train.driver.latest_checkpoint when Ray Train's run snapshot was lost or cut."""

from __future__ import annotations

import torch

from pipeline.train.checkpoint import CKPT_FILE, save_checkpoint
from pipeline.train.driver import SNAPSHOT_FILE, latest_checkpoint


def _checkpoint(run_dir, name, step):
    d = run_dir / name
    d.mkdir(parents=True)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(str(d), model, torch.optim.SGD(model.parameters(), lr=0.1), step, "run-a")
    return d


def test_a_cut_snapshot_falls_back_to_the_newest_complete_checkpoint(tmp_path, capfd):
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
    assert "unreadable" in capfd.readouterr().err


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
    from pipeline.train.driver import StorageError, open_run

    base = [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.run_name=ft"]
    cfg = load_config(None, base + ["train.steps=6"])
    uri, first = tracking.start_run(cfg, dump_yaml(cfg))
    tracking.end_run(uri, first, "KILLED")
    d = tmp_path / "runs" / "ft" / "checkpoint_1"
    d.mkdir(parents=True)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(str(d), model, torch.optim.SGD(model.parameters(), lr=0.1), 6, first)

    with pytest.raises(StorageError, match="already reached step 6 of train.steps=6"):
        open_run(cfg, str(tmp_path / "runs"), "ft")
    more = load_config(None, base + ["train.steps=10"])
    uri, run_id, latest = open_run(more, str(tmp_path / "runs"), "ft")
    assert run_id == first and latest["step"] == 6 and latest["path"] == str(d) and not latest["registered"]
    assert f"[train] resuming run {first} (ft) from step 6" in capsys.readouterr().out
    run = MlflowClient(tracking_uri=uri).get_run(first)
    assert run.info.status == "RUNNING" and run.data.tags["resumed_from_step"] == "6"
    # Another name starts a new run.
    other = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.run_name=new"])
    assert open_run(other, str(tmp_path / "runs"), "new")[1] != first
