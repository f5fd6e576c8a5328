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
