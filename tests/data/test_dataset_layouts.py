"""The seeds' data-set layouts (CASIA-WebFace, VehicleID, LFW) through make_shards to tars.

Each test builds a tiny fake tree in the exact layout (tiny JPEGs written with PIL, list
files in the real line format, a corrupt JPEG and a missing file among them) and reads
the resulting tars back with ``tarfile``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.make_shards import main
from pipeline.data.layouts import ClassItems, LayoutError, scan_lfw, scan_vehicleid, scan_webface
from pipeline.data.shards import write_shards
from pipeline.eval.evaluate import _rows_for
from pipeline.eval.vehicleid import read_test_list


def _jpeg(path: Path, value: int, size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value % 256, np.uint8)
    Image.fromarray(arr).save(path, format="JPEG")


def _samples(out: Path, manifest: dict, split: str | None = None) -> dict[str, dict[str, bytes]]:
    """Sample key -> {field: bytes} over the manifest's shards (of one split)."""
    got: dict[str, dict[str, bytes]] = {}
    for s in manifest["shards"]:
        if split and s["split"] != split:
            continue
        with tarfile.open(out / s["path"]) as tar:
            for m in tar.getmembers():
                key, field = m.name.split(".", 1)
                got.setdefault(key, {})[field] = tar.extractfile(m).read()
    return got


def _size(jpg: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(jpg)) as im:
        return im.size


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = main([*map(str, argv), "--workers", "1"])
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 else None), cap.err


# --- CASIA-WebFace ----------------------------------------------------------------------


@pytest.fixture
def webface(tmp_path):
    root = tmp_path / "CASIA-WebFace"
    for i, ident in enumerate(["0000045", "0000099", "0000100", "0000102"]):
        for n in range(1, 4):
            _jpeg(root / ident / f"{n:03d}.jpg", 30 * i + n, size=(25, 25))
    (root / "0000099" / "004.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt")
    (root / "0000100" / "005.jpg").symlink_to(root / "gone.jpg")  # a listed file that is missing
    return root


def test_webface_converts_resizes_and_reports(webface, tmp_path, capsys):
    out = tmp_path / "out"
    rc, summary, err = _run(capsys, "--layout", "webface", "--src", webface, "--out", out, "--image-size", "16",
                            "--holdout-fraction", "0.25")
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "webface" and manifest["image_size"] == 16 and manifest["extra_fields"] == []
    assert all("extras" not in c for c in manifest["classes"])
    assert [(c["name"], c["count"]) for c in manifest["classes"]] == [(n, 3) for n in
                                                                      ("0000045", "0000099", "0000100", "0000102")]
    assert summary["splits"]["holdout"]["classes"] == 1 and summary["splits"]["train"]["classes"] == 3
    assert summary["problems"] == 2
    assert any("missing image" in q and str(webface / "0000100" / "005.jpg") in q for q in manifest["problems"])
    assert any("unreadable image" in q and str(webface / "0000099" / "004.jpg") in q for q in manifest["problems"])
    assert str(webface / "0000099" / "004.jpg") in err and str(webface / "0000100" / "005.jpg") in err
    samples = _samples(out, manifest)
    assert len(samples) == 12
    for key, fields in samples.items():
        assert set(fields) == {"jpg", "cls"} and _size(fields["jpg"]) == (16, 16)
        cid = int(fields["cls"])
        assert key == f"{cid:07d}_{key.split('_', 1)[1]}"


def test_webface_keeps_size_with_zero(webface, tmp_path):
    scan = scan_webface(webface)
    m = write_shards(scan.classes, tmp_path / "o", holdout_fraction=0.0, workers=1, progress=False, image_size=0)
    assert {_size(f["jpg"]) for f in _samples(tmp_path / "o", m).values()} == {(25, 25)}


def test_resize_change_rewrites_shards(webface, tmp_path):
    classes = scan_webface(webface).classes
    kw = dict(holdout_fraction=0.0, workers=1, progress=False)
    write_shards(classes, tmp_path / "o", image_size=16, **kw)
    m = write_shards(classes, tmp_path / "o", image_size=8, **kw)  # resume must not keep 16x16 shards
    assert {_size(f["jpg"]) for f in _samples(tmp_path / "o", m).values()} == {(8, 8)}


# --- VehicleID --------------------------------------------------------------------------

TRAIN = {1: ["0000001", "0000002", "0000003"], 2: ["0000004", "0000005"], 3: ["0000006", "0000007"]}
TEST_800 = {10: ["0000010", "0000011"], 11: ["0000012", "0000013"]}
TEST_1600_EXTRA = {12: ["0000014", "0000015", "0000016"]}
MODELS = {1: 4, 10: 7}  # only part of the vehicles have a model
COLORS = {1: 0, 2: 1, 3: 2, 10: 3, 11: 4, 12: 5}


def _write_list(path: Path, rows: dict[int, list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{img} {vid:04d}\n" for vid, imgs in rows.items() for img in imgs))


@pytest.fixture
def vehicleid(tmp_path):
    root = tmp_path / "VehicleID_V1.0"
    everything = {**TRAIN, **TEST_800, **TEST_1600_EXTRA}
    for vid, imgs in everything.items():
        for j, img in enumerate(imgs):
            _jpeg(root / "image" / f"{img}.jpg", 10 * vid + j)
    (root / "image" / "0000005.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # corrupt
    _jpeg(root / "image" / "9999999.jpg", 1)  # in no list: ignored
    split = root / "train_test_split"
    _write_list(split / "train_list.txt", {**TRAIN, 3: TRAIN[3] + ["0000099"]})  # 0000099.jpg is missing
    _write_list(split / "test_list_800.txt", TEST_800)
    _write_list(split / "test_list_1600.txt", {**TEST_800, **TEST_1600_EXTRA})  # nested, as in the release
    attr = root / "attribute"
    attr.mkdir()
    (attr / "model_attr.txt").write_text("".join(f"{v:04d} {m}\n" for v, m in MODELS.items()))
    (attr / "color_attr.txt").write_text("".join(f"{v:04d} {c}\n" for v, c in COLORS.items()))
    return root


def test_vehicleid_shards_labels_and_extras(vehicleid, tmp_path, capsys):
    out = tmp_path / "out"
    rc, summary, err = _run(capsys, "--layout", "vehicleid", "--src", vehicleid, "--out", out, "--image-size", "0")
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra_fields"] == ["color", "model"] and manifest["holdout_fixed"] is True
    names = [c["name"] for c in manifest["classes"]]
    assert names == ["00001", "00002", "00003", "00010", "00011", "00012"]
    split_of = {c["name"]: c["split"] for c in manifest["classes"]}
    assert [n for n in names if split_of[n] == "train"] == ["00001", "00002", "00003"]
    counts = {c["name"]: c["count"] for c in manifest["classes"]}
    assert counts == {"00001": 3, "00002": 1, "00003": 2, "00010": 2, "00011": 2, "00012": 3}  # test images once
    assert {c["name"]: c["extras"] for c in manifest["classes"]} == {
        f"{v:05d}": {"color": COLORS[v], "model": MODELS.get(v, -1)} for v in (1, 2, 3, 10, 11, 12)}
    # the missing list entry and the corrupt file are reported by path; nothing else is lost
    missing = str(vehicleid / "image" / "0000099.jpg")
    corrupt = str(vehicleid / "image" / "0000005.jpg")
    assert any("missing image" in q and missing in q and "train_list.txt:" in q for q in manifest["problems"])
    assert any("unreadable image" in q and corrupt in q for q in manifest["problems"])
    assert len(manifest["problems"]) == 2 and missing in err and corrupt in err
    assert summary["copied"] == ["test_list_1600.txt", "test_list_800.txt"]
    assert (out / "test_list_800.txt").read_bytes() == (vehicleid / "train_test_split" / "test_list_800.txt").read_bytes()
    # every sample carries cls, model and colour as ASCII ints; unknown model -> -1
    vid_of = {n: int(n) for n in names}
    samples = _samples(out, manifest)
    assert len(samples) == 13
    for key, fields in samples.items():
        assert set(fields) == {"jpg", "cls", "model", "color"}
        vid = vid_of[names[int(fields["cls"])]]
        assert int(fields["model"]) == MODELS.get(vid, -1)
        assert int(fields["color"]) == COLORS[vid]
    assert {k.split("_", 1)[1] for k in _samples(out, manifest, "holdout")} == {
        img for imgs in [*TEST_800.values(), *TEST_1600_EXTRA.values()] for img in imgs}
    # the evaluation job finds every test-list image by stem in OUT/holdout
    keys = np.asarray(sorted(_samples(out, manifest, "holdout")))
    for lst in ("test_list_800.txt", "test_list_1600.txt"):
        entries = read_test_list(out / lst)
        rows = _rows_for([name for name, _ in entries], keys, lst)
        assert len(rows) == len(entries)
    # no exemplar of a held-out vehicle; exemplars carry the extras too
    ex = _samples(out, {"shards": manifest["exemplar_shards"]})
    assert ex and all(set(f) == {"jpg", "cls", "model", "color"} for f in ex.values())


def test_vehicleid_bad_list_line_names_file_and_line(vehicleid, tmp_path, capsys):
    lst = vehicleid / "train_test_split" / "test_list_800.txt"
    lst.write_text(lst.read_text() + "0000017\n")
    rc, _, err = _run(capsys, "--layout", "vehicleid", "--src", vehicleid, "--out", tmp_path / "o")
    n_lines = len(lst.read_text().splitlines())
    assert rc == 2 and f"{lst}:{n_lines}" in err and "<image name> <vehicle id>" in err


def test_vehicleid_test_vehicle_without_images(vehicleid):
    for img in TEST_1600_EXTRA[12]:
        (vehicleid / "image" / f"{img}.jpg").unlink()
    scan = scan_vehicleid(vehicleid)
    assert scan.holdout == {"00010", "00011"} and sum("missing image" in q for q in scan.problems) == 4


def test_vehicleid_bad_attribute_line(vehicleid):
    f = vehicleid / "attribute" / "color_attr.txt"
    f.write_text("0001 red\n")
    with pytest.raises(LayoutError, match=f"{f}:1"):
        scan_vehicleid(vehicleid)


def test_vehicleid_image_listed_with_two_vehicles(vehicleid):
    lst = vehicleid / "train_test_split" / "test_list_1600.txt"
    lst.write_text(lst.read_text() + "0000001 0011\n")
    with pytest.raises(LayoutError, match="0000001.*vehicle 11.*vehicle 1 in"):
        scan_vehicleid(vehicleid)


def test_vehicleid_missing_parts(tmp_path, vehicleid):
    with pytest.raises(LayoutError, match="empty_dir_that_is_missing"):
        scan_vehicleid(tmp_path / "empty_dir_that_is_missing")
    (vehicleid / "train_test_split" / "train_list.txt").unlink()
    with pytest.raises(LayoutError, match="train_list.txt"):
        scan_vehicleid(vehicleid)


def test_vehicleid_without_attributes_labels_unknown(vehicleid):
    for f in (vehicleid / "attribute").iterdir():
        f.unlink()
    scan = scan_vehicleid(vehicleid)
    assert all(v == -1 for c in scan.classes for vals in c.extras.values() for v in vals)
    assert sum("every model label is -1" in q or "every color label is -1" in q for q in scan.problems) == 2


def test_vehicleid_holdout_fraction_is_refused(vehicleid, tmp_path, capsys):
    rc, _, err = _run(capsys, "--layout", "vehicleid", "--src", vehicleid, "--out", tmp_path / "o",
                      "--holdout-fraction", "0.3")
    assert rc == 2 and "--holdout-fraction" in err


# --- LFW --------------------------------------------------------------------------------

PEOPLE = {"Aaron_Eckhart": 1, "Abel_Pacheco": 2, "Zico": 3}


@pytest.fixture
def lfw(tmp_path):
    root = tmp_path / "lfw"
    for i, (person, n) in enumerate(PEOPLE.items()):
        for k in range(1, n + 1):
            _jpeg(root / person / f"{person}_{k:04d}.jpg", 40 * i + k)
    (root / "Zico" / "Zico_0004.jpg").write_bytes(b"\xff\xd8 corrupt")
    # pairs.txt beside lfw/, as in the download: 1 fold of 2 matched + 2 mismatched pairs
    (tmp_path / "pairs.txt").write_text("1\t2\nAbel_Pacheco\t1\t2\nZico\t1\t3\n"
                                        "Aaron_Eckhart\t1\tZico\t2\nAbel_Pacheco\t2\tZico\t9\n")
    return root


def test_lfw_all_holdout_and_pairs_copied(lfw, tmp_path, capsys):
    out = tmp_path / "out"
    rc, summary, err = _run(capsys, "--layout", "lfw", "--src", lfw, "--out", out, "--image-size", "0")
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"] == {"classes": 0, "images": 0, "shards": 0}
    assert manifest["splits"]["holdout"] == {"classes": 3, "images": 6, "shards": 1}
    assert manifest["splits"]["exemplars"]["images"] == 0 and manifest["holdout_fraction"] == 1.0
    assert (out / "pairs.txt").read_bytes() == (tmp_path / "pairs.txt").read_bytes() and summary["copied"] == ["pairs.txt"]
    # the pair naming Zico_0009 (absent) and the corrupt Zico_0004 are reported; the rest is converted
    assert any("Zico_0009" in q for q in manifest["problems"])
    assert any("unreadable image" in q and str(lfw / "Zico" / "Zico_0004.jpg") in q for q in manifest["problems"])
    assert len(manifest["problems"]) == 2
    samples = _samples(out, manifest, "holdout")
    stems = sorted(k.split("_", 1)[1] for k in samples)
    assert stems == sorted(f"{p}_{k:04d}" for p, n in PEOPLE.items() for k in range(1, n + 1))
    keys = np.asarray(sorted(samples))
    assert len(_rows_for(["Abel_Pacheco_0001", "Zico_0003", "Aaron_Eckhart_0001"], keys, "pairs.txt")) == 3


def test_lfw_without_pairs_is_a_problem_not_an_error(lfw, tmp_path):
    (tmp_path / "pairs.txt").unlink()
    scan = scan_lfw(lfw)
    assert scan.holdout == set(PEOPLE) and not scan.copy_files
    assert any("pairs.txt" in q for q in scan.problems)


# --- write_shards extras ----------------------------------------------------------------


def test_extras_follow_chunking_and_missing_files(tmp_path):
    src = tmp_path / "img"
    imgs = []
    for i in range(5):
        _jpeg(src / f"{i}.jpg", i)
        imgs.append(src / f"{i}.jpg")
    imgs[3] = src / "gone.jpg"
    big = ClassItems("a", imgs, [f"k{i}" for i in range(5)], {"model": [0, 1, 2, 3, 4]})
    small = ClassItems("b", [src / "0.jpg"], ["k9"], {"model": [-1]})
    m = write_shards([big, small], tmp_path / "o", holdout_fraction=0.0, shard_size=2, workers=1, progress=False)
    got = _samples(tmp_path / "o", m)
    assert {k: int(f["model"]) for k, f in got.items()} == {
        "0000000_k0": 0, "0000000_k1": 1, "0000000_k2": 2, "0000000_k4": 4, "0000001_k9": -1}
    assert m["problems"] == [f"missing image (skipped): {src / 'gone.jpg'}"]


def test_extras_must_agree(tmp_path):
    a = ClassItems("a", [b"x"], ["k"], {"model": [1]})
    with pytest.raises(ValueError, match="extra fields"):
        write_shards([a, ClassItems("b", [b"x"], ["k"])], tmp_path, workers=1, progress=False)
    with pytest.raises(ValueError, match="values for 2 images"):
        write_shards([ClassItems("a", [b"x", b"y"], ["k", "l"], {"model": [1]})], tmp_path, workers=1, progress=False)
    with pytest.raises(ValueError, match="not among the classes"):
        write_shards([a], tmp_path, holdout_classes={"zz"}, workers=1, progress=False)
