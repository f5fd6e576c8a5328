"""The make_shards job: arguments in, shards + manifest out, exit 2 with a message on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jobs.make_shards import main


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_synthetic_writes_train_holdout_manifest(tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(["--layout", "synthetic", "--num-classes", "6", "--images-per-class", "3", "--image-size", "16",
               "--holdout-fraction", "0.5", "--shard-size", "4", "--workers", "1", "--out", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "synthetic" and manifest["problems"] == []
    assert manifest["splits"]["train"] == {"classes": 3, "images": 9, "shards": 3}
    assert manifest["splits"]["holdout"] == {"classes": 3, "images": 9, "shards": 3}
    assert len(list((out / "train").glob("*.tar"))) == 3 and len(list((out / "holdout").glob("*.tar"))) == 3
    summary = _last_json(capsys.readouterr().out)
    assert summary == {"out": str(out), "splits": manifest["splits"], "problems": 0}


def test_imagefolder_missing_src_exits_2(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    assert main(["--layout", "imagefolder", "--src", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err
    assert not (tmp_path / "o").exists()


def test_imagefolder_without_src_exits_2(tmp_path, capsys):
    assert main(["--layout", "imagefolder", "--out", str(tmp_path / "o")]) == 2
    assert "--src" in capsys.readouterr().err


def test_bad_holdout_fraction_exits_2(tmp_path, capsys):
    rc = main(["--layout", "synthetic", "--num-classes", "4", "--images-per-class", "2", "--image-size", "16",
               "--holdout-fraction", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--holdout-fraction" in capsys.readouterr().err


def test_unknown_layout_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--layout", "coco", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_imagefolder_warns_and_converts_the_rest(tmp_path, capsys):
    src = tmp_path / "src"
    for name in ("id_a", "id_b", "id_c"):
        (src / name).mkdir(parents=True)
        for i in range(2):
            arr = np.full((16, 16, 3), 40 * i, np.uint8)
            Image.fromarray(arr).save(src / name / f"{i}.jpg", format="JPEG")
    (src / "id_empty").mkdir()
    (src / "id_b" / "notes.txt").write_text("hello")
    (src / "id_c" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    out = tmp_path / "out"
    rc = main(["--layout", "imagefolder", "--src", str(src), "--out", str(out), "--holdout-fraction", "0.34",
               "--workers", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 3
    assert any(str(src / "id_empty") in w for w in warnings)
    assert any(str(src / "id_b" / "notes.txt") in w for w in warnings)
    assert any(str(src / "id_c" / "broken.jpg") in w for w in warnings)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(c["name"], c["count"]) for c in manifest["classes"]] == [("id_a", 2), ("id_b", 2), ("id_c", 2)]
    assert manifest["splits"]["train"]["images"] + manifest["splits"]["holdout"]["images"] == 6
    assert manifest["splits"]["holdout"]["classes"] == 1 and len(manifest["problems"]) == 3
