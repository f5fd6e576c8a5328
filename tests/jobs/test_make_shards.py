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
    stdout = capsys.readouterr().out
    assert f"[make_shards] per-sample index (samples): train 9, holdout 9, exemplars 6 in {out}/index-<split>.json" \
        in stdout
    summary = _last_json(stdout)
    assert summary == {"out": str(out), "splits": manifest["splits"], "problems": 0}


def test_a_validation_split_is_written_indexed_and_announced(tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(["--layout", "synthetic", "--num-classes", "10", "--images-per-class", "2", "--image-size", "16",
               "--val-fraction", "0.2", "--workers", "1", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    splits = _last_json(captured.out)["splits"]
    assert (splits["train"]["classes"], splits["holdout"]["classes"], splits["val"]["classes"]) == (4, 5, 1)
    assert f"validation split: 1 class, 2 images in {out}/val (--val-fraction 0.2)" in captured.err
    assert f"eval.data={out}/val" in captured.err
    assert "holdout 10, val 2, exemplars 8" in captured.out
    assert (out / "index-val.json").is_file() and len(list((out / "val").glob("*.tar"))) == 1
    (out / "index-val.json").unlink()
    assert main(["--reindex", str(out)]) == 0 and (out / "index-val.json").is_file()


def test_synthetic_shapes_layout_with_a_count_range(tmp_path, capsys):
    out = tmp_path / "shapes"
    rc = main(["--layout", "synthetic_shapes", "--num-classes", "8", "--images-per-class", "2-5", "--image-size", "16",
               "--shard-size", "50", "--workers", "1", "--out", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "synthetic_shapes" and manifest["problems"] == []
    counts = [c["count"] for c in manifest["classes"]]
    assert len(counts) == 8 and all(2 <= n <= 5 for n in counts)
    assert manifest["splits"]["train"]["classes"] == manifest["splits"]["holdout"]["classes"] == 4
    assert sorted(c["name"] for c in manifest["classes"]) == [f"s{i:05d}" for i in range(8)]


@pytest.mark.parametrize("args, message", [
    (["--layout", "synthetic", "--images-per-class", "2-5"], "--images-per-class LO-HI is for --layout synthetic_shapes"),
    (["--layout", "synthetic_shapes", "--images-per-class", "5-2"], "1 <= LO <= HI"),
    (["--layout", "synthetic_shapes", "--images-per-class", "many"], "expected N or LO-HI"),
])
def test_bad_images_per_class_is_a_usage_error_naming_it(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "--images-per-class" in err


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


def _folder(src, names):
    for name in names:
        (src / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / name / f"{i}.jpg", format="JPEG")


def _holdout_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "held out" in line]


def test_imagefolder_says_how_many_identities_the_default_held_out(tmp_path, capsys):
    src = tmp_path / "src"
    _folder(src, ["a", "b", "c", "d"])
    assert main(["--layout", "imagefolder", "--src", str(src), "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert _holdout_lines(captured.err) == [
        ("[make_shards] held out 2 of 4 identities for evaluation (--holdout-fraction 0.5, the default); "
         "--holdout-fraction 0 trains on all of them")]
    assert _last_json(captured.out)["splits"]["holdout"]["classes"] == 2


def test_imagefolder_holdout_zero_is_said_too(tmp_path, capsys):
    src = tmp_path / "src"
    _folder(src, ["a", "b", "c"])
    assert main(["--layout", "imagefolder", "--src", str(src), "--out", str(tmp_path / "o"), "--workers", "1",
                 "--holdout-fraction", "0"]) == 0
    assert _holdout_lines(capsys.readouterr().err) == [
        ("[make_shards] held out 0 of 3 identities for evaluation (--holdout-fraction 0, as asked); "
         "--holdout-fraction 0 trains on all of them")]


def test_reindex_adds_the_index_a_conversion_writes(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["--layout", "synthetic", "--num-classes", "8", "--images-per-class", "3", "--image-size", "16",
                 "--shard-size", "5", "--workers", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"] == {"classes": 4, "images": 12, "shards": 4}  # 3 + 3 > 5: a class a shard
    written = {p.name: p.read_bytes() for p in out.glob("index-*")}
    assert len(written) == 6  # train, holdout, exemplars: .json + .bin
    tars = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    for p in out.glob("index-*"):
        p.unlink()
    capsys.readouterr()
    assert main(["--reindex", str(out), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert {p.name: p.read_bytes() for p in out.glob("index-*")} == written
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == tars  # nothing re-encoded
    lines = captured.out.strip().splitlines()
    assert lines[0] == f"[make_shards] wrote {out / 'index-train.json'} (+ .bin): 12 samples of 4 shards, " \
                       f"{(out / 'index-train.bin').stat().st_size} bytes"
    summary = _last_json(captured.out)
    assert summary["reindexed"] == str(out)
    assert {k: v["rows"] for k, v in summary["index"].items()} == {"train": 12, "holdout": 12, "exemplars": 8}


def test_reindex_without_a_shard_set_exits_2(tmp_path, capsys):
    assert main(["--reindex", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "manifest.json" in err and str(tmp_path) in err


def test_layout_and_out_required_without_reindex(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path)])
    assert e.value.code == 2 and "--reindex OUT" in capsys.readouterr().err
