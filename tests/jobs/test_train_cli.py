"""jobs.train before anything starts: config typos exit 2 with the nearest value, --print-config round-trips."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from pipeline.config import choices, load_config, to_dict

FIXED_KEYS = {
    "loss.name": ("npair_mcc", "npair_mc"),
    "loss.negatives": ("onne", "one"),
    "model.backbone": ("resnet181", "resnet18"),
    "model.head": ("linear_nb", "linear_bn"),
    "model.arch": ("mixed-diff", "mixed_diff"),
    "model.norm": ("grup", "group"),
    "train.optimizer": ("adamw", "adam"),
    "miner.index": ("hnsww", "hnsw"),
    "data.class_sampling": ("proportionel", "proportional"),
    "data.augment": ("flips", "flip"),
    "train.precision": ("bf61", "bf16"),
    "train.lr_schedule": ("cosin", "cosine"),
    "data.decode_device": ("gpu", "cpu"),
    "miner.candidates": ("kn", "knn"),
    "miner.source": ("emma", "ema"),
    "miner.refresh_by": ("trainer", "trainers"),
    "miner.select_at": ("planer", "planner"),
}


def test_every_fixed_value_key_is_covered():
    from pipeline.config import to_flat_dict

    leaves = to_flat_dict(load_config())
    assert {k for k in leaves if choices(k)} == set(FIXED_KEYS)


def test_the_config_choices_are_the_libraries_names():
    from pipeline.losses.factory import LOSS_NAMES
    from pipeline.losses.triplet import NEGATIVES
    from pipeline.mining.class_index import INDEX_KINDS
    from pipeline.models.embedding import BACKBONES, HEADS, NORMS
    from pipeline.models.factory import ARCHS

    assert choices("loss.name") == LOSS_NAMES and choices("loss.negatives") == NEGATIVES
    assert set(choices("model.backbone")) == set(BACKBONES)
    assert choices("model.head") == HEADS and choices("model.norm") == NORMS and choices("model.arch") == ARCHS
    assert choices("miner.index") == INDEX_KINDS


def test_a_typo_exits_2_before_ray_or_mlflow_start(tmp_path):
    # One fresh process for all keys (this test session may have a Ray instance of its own).
    script = f"""
import json, sys
from jobs.train import main
out = {{}}
for key, typo in {sorted((k, v[0]) for k, v in FIXED_KEYS.items())!r}:
    out[key] = main(["--config", {str(_repo() / "configs/quickstart.yaml")!r}, f"{{key}}={{typo}}"])
import ray
out["ray"] = ray.is_initialized()
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=_env())
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out.pop("ray") is False
    assert out == {k: 2 for k in FIXED_KEYS}
    for key, (typo, nearest) in FIXED_KEYS.items():
        line = next(ln for ln in p.stderr.splitlines() if f"config key '{key}'" in ln)
        assert f"did you mean '{nearest}'?" in line and repr(typo) in line, line
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no runs/


def _env():
    import os

    env = dict(os.environ, PYTHONPATH=str(_repo()))
    env.pop("RAY_ADDRESS", None)
    return env


def test_print_config_round_trips(tmp_path):
    overrides = ["train.steps=7", "loss.name=triplet", "loss.scale=0", "loss.margin=0.3", "eval.ks=[1,5]", "miner.index=hnsw"]
    p = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/quickstart.yaml", "--print-config",
                        *overrides], cwd=_repo(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    printed = yaml.safe_load(p.stdout)
    want = load_config(_repo() / "configs/quickstart.yaml", overrides)
    assert printed == to_dict(want)
    assert printed["train"]["steps"] == 7 and printed["loss"]["margin"] == 0.3 and printed["eval"]["ks"] == [1, 5]
    (tmp_path / "resolved.yaml").write_text(p.stdout)
    assert to_dict(load_config(tmp_path / "resolved.yaml")) == to_dict(want)


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
