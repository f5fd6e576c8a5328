"""The config tree: defaults, then YAML file, then dotted overrides; errors name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, config_from_dict, dump_yaml, load_config, to_dict, to_flat_dict

REPO = Path(__file__).resolve().parents[1]

# Keys other parts of the project (jobs, driver, docs) rely on; renaming one is a breaking change.
CONTRACT_KEYS = [
    "data.train", "data.eval", "model.backbone", "model.embedding_dim", "loss.name", "loss.l2_reg",
    "batch.classes_per_batch", "batch.images_per_class", "miner.enabled", "train.steps", "train.lr",
    "train.seed", "scaling.num_workers", "scaling.use_gpu", "tracking.uri", "tracking.experiment",
]


def _yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.steps == 100 and cfg.train.lr == 0.01 and cfg.train.seed == 0
    assert cfg.loss.name == "npair_mc" and cfg.loss.l2_reg == 0.002 and cfg.loss.margin is None
    assert cfg.batch.classes_per_batch == 16 and cfg.batch.images_per_class == 2
    assert cfg.scaling.num_workers == 2 and cfg.scaling.use_gpu is False
    assert cfg.eval.ks == [1, 2, 4, 8]
    assert cfg.data.train == "" and cfg.tracking.experiment == "dml"
    assert load_config(None, []) == cfg


def test_contract_keys_exist():
    flat = to_flat_dict(load_config())
    missing = [k for k in CONTRACT_KEYS if k not in flat]
    assert missing == []


def test_file_then_overrides_precedence(tmp_path):
    p = _yaml(tmp_path, "train:\n  steps: 7\n  lr: 0.5\nmodel:\n  backbone: tiny\n")
    cfg = load_config(p)
    assert (cfg.train.steps, cfg.train.lr, cfg.model.backbone) == (7, 0.5, "tiny")
    assert cfg.train.seed == 0  # untouched keys keep their defaults
    cfg = load_config(str(p), ["train.steps=9"])
    assert (cfg.train.steps, cfg.train.lr) == (9, 0.5)
    # Later overrides win over earlier ones.
    assert load_config(p, ["train.steps=9", "train.steps=11"]).train.steps == 11


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "")) == load_config()


@pytest.mark.parametrize(
    "override, get, expected",
    [
        ("train.steps=50", lambda c: c.train.steps, 50),
        ("train.lr=0.25", lambda c: c.train.lr, 0.25),
        ("train.lr=1", lambda c: c.train.lr, 1.0),
        ("train.lr=1e-3", lambda c: c.train.lr, 1e-3),  # YAML 1.1 reads '1e-3' as a string
        ("miner.enabled=true", lambda c: c.miner.enabled, True),
        ("scaling.use_gpu=false", lambda c: c.scaling.use_gpu, False),
        ("model.backbone=resnet50", lambda c: c.model.backbone, "resnet50"),
        ("data.train=/tmp/x/train", lambda c: c.data.train, "/tmp/x/train"),
        ("tracking.experiment=123", lambda c: c.tracking.experiment, "123"),  # a str field keeps digits as text
        ("loss.margin=0.3", lambda c: c.loss.margin, 0.3),
        ("loss.margin=null", lambda c: c.loss.margin, None),
        ("loss.cross_rank=true", lambda c: c.loss.cross_rank, True),
        ("eval.ks=[1,5]", lambda c: c.eval.ks, [1, 5]),
        ("eval.ks=[1, 5, 10]", lambda c: c.eval.ks, [1, 5, 10]),
    ],
)
def test_override_types(override, get, expected):
    value = get(load_config(None, [override]))
    assert value == expected and type(value) is type(expected)


def test_optional_override_back_to_null_after_file(tmp_path):
    p = _yaml(tmp_path, "loss:\n  margin: 0.2\n")
    assert load_config(p).loss.margin == 0.2
    assert load_config(p, ["loss.margin=null"]).loss.margin is None


def test_unknown_override_names_key_and_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stpes=5"])
    assert "train.stpes" in str(e.value) and "train.steps" in str(e.value)


def test_unknown_section_names_key():
    with pytest.raises(ConfigError, match="trian.steps"):
        load_config(None, ["trian.steps=5"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = _yaml(tmp_path, "train:\n  stpes: 5\n", name="bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.stpes" in msg and "train.steps" in msg


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("scaling.use_gpu=3", "scaling.use_gpu"),
    ("train.lr=fast", "train.lr"),
    ("miner.enabled=[1]", "miner.enabled"),
    ("eval.ks=[1,x]", "eval.ks"),
    ("train.steps=[", "train.steps"),  # unparsable YAML is a type error, not a parser traceback
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_wrong_type_in_file_names_file_and_key(tmp_path):
    p = _yaml(tmp_path, "scaling:\n  use_gpu: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "scaling.use_gpu" in str(e.value)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps"])


def test_section_as_value_is_rejected():
    with pytest.raises(ConfigError, match="'train' is a section"):
        load_config(None, ["train=3"])


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


def test_non_mapping_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_yaml(tmp_path, "train: [1,\n", name="broken.yaml"))


def test_classes_per_batch_divisible_by_workers():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["batch.classes_per_batch=6", "scaling.num_workers=4"])
    assert "batch.classes_per_batch" in str(e.value) and "scaling.num_workers" in str(e.value)
    cfg = load_config(None, ["batch.classes_per_batch=8", "scaling.num_workers=4"])
    assert (cfg.batch.classes_per_batch, cfg.scaling.num_workers) == (8, 4)


def test_npair_needs_two_images_per_class():
    with pytest.raises(ConfigError, match="batch.images_per_class"):
        load_config(None, ["batch.images_per_class=4"])
    # Other losses take M images per class.
    cfg = load_config(None, ["loss.name=triplet", "batch.images_per_class=4"])
    assert cfg.batch.images_per_class == 4


def test_one_negative_is_for_the_triplet_loss():
    assert load_config(None, ["loss.name=triplet", "loss.negatives=one"]).loss.negatives == "one"
    with pytest.raises(ConfigError, match="'loss.negatives' .one. applies to loss.name=triplet only"):
        load_config(None, ["loss.negatives=one"])
    with pytest.raises(ConfigError, match="loss.negatives"):
        load_config(None, ["loss.name=triplet", "loss.negatives=hardest"])


def test_scale_is_for_the_npair_losses():
    assert load_config(None, ["loss.scale=16"]).loss.scale == 16.0
    assert load_config(None, ["loss.name=npair_ovo", "loss.scale=1"]).loss.scale == 1.0
    with pytest.raises(ConfigError, match="'loss.scale' .16.0. must be >= 0 and applies to loss.name=npair_mc"):
        load_config(None, ["loss.name=triplet", "loss.scale=16"])
    with pytest.raises(ConfigError, match="'loss.scale'"):
        load_config(None, ["loss.scale=-2"])


@pytest.mark.parametrize("override, key", [
    ("batch.classes_per_batch=1", "batch.classes_per_batch"),
    ("train.steps=0", "train.steps"),
    ("train.lr=0", "train.lr"),
    ("train.optimizer=rmsprop", "train.optimizer"),
    ("data.image_size=8", "data.image_size"),
])
def test_range_checks_name_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_direct_construction_validates():
    from pipeline.config import BatchConfig

    with pytest.raises(ConfigError, match="batch.images_per_class"):
        Config(batch=BatchConfig(images_per_class=3))


def test_round_trip_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["train.steps=9", "loss.name=triplet", "loss.margin=0.3", "batch.images_per_class=4",
                             "eval.ks=[1,5]", "scaling.use_gpu=true", "data.train=/x"])
    d = to_dict(cfg)
    assert d["train"]["steps"] == 9 and d["eval"]["ks"] == [1, 5]
    assert config_from_dict(d) == cfg
    # The dumped YAML is itself a valid config file that reproduces the run.
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == d
    assert load_config(_yaml(tmp_path, text)) == cfg


def test_flat_dict():
    flat = to_flat_dict(load_config(None, ["train.steps=9"]))
    assert flat["train.steps"] == 9 and flat["loss.margin"] is None and flat["eval.ks"] == [1, 2, 4, 8]
    assert all(not isinstance(v, dict) for v in flat.values())


def test_config_from_dict_rejects_unknown_and_invalid():
    with pytest.raises(ConfigError, match="train.stpes"):
        config_from_dict({"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match="batch.classes_per_batch"):
        config_from_dict({"batch": {"classes_per_batch": 5}})  # 5 % 2 workers


def test_train_job_rejects_bad_key_before_ray(tmp_path):
    p = _yaml(tmp_path, "train:\n  steps: 3\n")
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(p), "bad.key=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "bad.key" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("text, expected", [
    ("augment: true", "flip"), ("augment: false", "none"), ("augment: yes", "flip"),
    ("augment: flip", "flip"), ("augment: none", "none"), ("augment: crop", "crop"), ("augment: flip_crop", "flip_crop"),
])
def test_augment_names_and_the_old_booleans(tmp_path, text, expected):
    """data.augment was a bool (true = flip): old files and overrides still load, as the named value."""
    assert load_config(_yaml(tmp_path, f"data:\n  {text}\n")).data.augment == expected
    value = text.split(": ")[1]
    assert load_config(None, [f"data.augment={value}"]).data.augment == expected
    assert load_config().data.augment == "none"  # the default is the one that is never wrong


def test_bad_augment_names_the_key_the_choices_and_the_nearest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.augment=flips"])
    assert str(e.value) == ("config key 'data.augment' must be one of none, flip, crop, flip_crop, got 'flips'; "
                            "did you mean 'flip'?")
    with pytest.raises(ConfigError, match=r"cfg.yaml: config key 'data.augment' must be one of"):
        load_config(_yaml(tmp_path, "data:\n  augment: 2\n"))
