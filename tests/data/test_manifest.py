"""The driver's data guards: no split mixing, data.image_size from the manifest, jobs.train exits 2 first."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.data.manifest import FALLBACK_IMAGE_SIZE, ShardError, check_split, prepare_data, resolve_image_size


@pytest.fixture(scope="module")
def shards_112(tmp_path_factory):
    """6 classes x 4 images written at 112x112 (resized at conversion), half held out."""
    from pipeline.data.layouts import synthetic_classes
    from pipeline.data.shards import write_shards

    out = tmp_path_factory.mktemp("s112")
    write_shards(synthetic_classes(6, 4, image_size=32, seed=2), out, holdout_fraction=0.5, shard_size=8, seed=2,
                 workers=1, progress=False, exemplars=2, image_size=112)
    return out


def test_the_shard_set_root_is_refused_naming_its_train_split(shards_112):
    with pytest.raises(ShardError) as e:
        check_split(str(shards_112), "data.train")
    msg = str(e.value)
    assert f"use data.train='{shards_112 / 'train'}'" in msg
    assert "holdout shard" in msg and "exemplars shard" in msg


@pytest.mark.parametrize("sub,key,want", [("holdout", "data.train", "train"), ("exemplars", "data.train", "train"),
                                          ("train", "data.eval", "holdout"), ("", "data.eval", "holdout")])
def test_another_split_is_refused(shards_112, sub, key, want):
    with pytest.raises(ShardError, match=f"use {key}='{shards_112 / want}'"):
        check_split(str(shards_112 / sub) if sub else str(shards_112), key)


def test_a_glob_over_every_split_is_refused(shards_112):
    with pytest.raises(ShardError, match="holdout"):
        check_split(f"{shards_112}/*/*.tar", "data.train")


def test_the_right_splits_pass(shards_112):
    check_split(str(shards_112 / "train"), "data.train")
    check_split(f"{shards_112}/train/*.tar", "data.train")
    check_split(str(shards_112 / "holdout"), "data.eval")


@pytest.fixture(scope="module")
def with_val(tmp_path_factory):
    """8 classes x 2 images: 4 held out, 2 of the other 4 in a validation split."""
    from pipeline.data.layouts import synthetic_classes
    from pipeline.data.shards import write_shards

    out = tmp_path_factory.mktemp("val")
    write_shards(synthetic_classes(8, 2, image_size=16, seed=0), out, holdout_fraction=0.5, shard_size=4, seed=0,
                 workers=1, progress=False, val_fraction=0.5)
    return out


def test_eval_data_takes_a_validation_split_or_the_holdout_but_not_train_nor_a_mix(with_val):
    check_split(str(with_val / "val"), "eval.data")
    check_split(str(with_val / "holdout"), "eval.data")
    with pytest.raises(ShardError, match=f"takes in 1 train shard.*use eval.data='{with_val / 'val'}'"):
        check_split(str(with_val / "train"), "eval.data")
    with pytest.raises(ShardError, match="2 holdout shards, 1 val shard"):
        check_split(f"{with_val}/[hv]*/*.tar", "eval.data")
    with pytest.raises(ShardError, match=f"use data.eval='{with_val / 'holdout'}'"):
        check_split(str(with_val / "val"), "data.eval")


def test_the_validation_split_is_a_run_input_of_its_own(with_val):
    import json

    from pipeline.data.manifest import spec_split
    from pipeline.train.driver import shard_inputs

    assert (spec_split(str(with_val / "val")), spec_split(str(with_val / "holdout"))) == ("val", "holdout")
    assert spec_split(f"{with_val}/[hv]*/*.tar") is None and spec_split("s3://bucket/val") is None
    cfg = load_config(None, [f"data.train={with_val}/train", f"data.eval={with_val}/holdout",
                             f"eval.data={with_val}/val"])
    inputs = {i.tags[0].value: i.dataset for i in shard_inputs(cfg)}
    assert sorted(inputs) == ["eval", "train", "validation"]
    assert inputs["validation"].name == f"{with_val.name}/val"
    assert json.loads(inputs["validation"].profile)["classes"] == 2
    assert inputs["validation"].digest != inputs["eval"].digest


def test_a_112_px_shard_set_trains_at_112_unless_told_otherwise(shards_112, capsys):
    cfg = load_config(None, [f"data.train={shards_112}/train", f"data.eval={shards_112}/holdout"])
    assert cfg.data.image_size == 0
    prepare_data(cfg)
    assert cfg.data.image_size == 112 and capsys.readouterr().out == ""
    told = load_config(None, [f"data.train={shards_112}/train", "data.image_size=64"])
    assert resolve_image_size(told) == 64
    out = capsys.readouterr().out
    assert out.count("note: data.image_size=64 but the shards") == 1 and "written at 112x112" in out


def test_shards_that_keep_source_sizes_fall_back_and_say_so(tiny_shards, capsys):
    cfg = load_config(None, [f"data.train={tiny_shards}/train"])
    assert resolve_image_size(cfg) == FALLBACK_IMAGE_SIZE
    assert "keep their source sizes" in capsys.readouterr().out


def test_jobs_train_exits_2_before_ray_or_mlflow(shards_112, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(_repo()))
    env.pop("RAY_ADDRESS", None)
    script = (f"import sys; from jobs.train import main; rc = main(['--config', {str(_repo() / 'configs/quickstart.yaml')!r}, "
              f"'data.train={shards_112}', 'data.eval=']); import ray; print(ray.is_initialized()); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr
    assert f"use data.train='{shards_112 / 'train'}'" in p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False" and list(tmp_path.iterdir()) == []


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
