"""When the loop checkpoints and evaluates, and the typed worker config's round trip."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pipeline.config import Config, ConfigError, load_config
from pipeline.train.checkpointer import Checkpointer
from pipeline.train.driver import best_checkpoint
from pipeline.train.worker_config import WorkerConfig


def _ckpt(steps=10, every=0, eval_every=0, evaluates=True):
    cfg = Config()
    cfg.train.steps, cfg.train.checkpoint_every, cfg.eval.every = steps, every, eval_every
    return Checkpointer(cfg, "run", "planner", 0, 2, evaluates)


@pytest.mark.parametrize("every,eval_every,evaluates,due,evals", [
    (0, 0, True, [10], [10]),
    (0, 4, True, [4, 8, 10], [4, 8, 10]),
    (3, 4, True, [3, 4, 6, 8, 9, 10], [4, 8, 10]),
    (3, 4, False, [3, 6, 9, 10], []),  # no eval set: eval.every means nothing
])
def test_checkpoints_are_due_at_the_end_every_n_and_at_each_evaluation(every, eval_every, evaluates, due, evals):
    c = _ckpt(10, every, eval_every, evaluates)
    assert [s for s in range(1, 11) if c.due(s)] == due
    assert [s for s in range(1, 11) if c.eval_due(s)] == evals


def test_best_checkpoint_is_the_highest_score_ties_to_the_later_step():
    ranked = [("c2", {"step": 2, "eval_score": 0.5}), ("c3", {"step": 3, "eval_score": -math.inf}),
              ("c4", {"step": 4, "eval_score": 0.7}), ("c6", {"step": 6, "eval_score": 0.7})]
    result = SimpleNamespace(best_checkpoints=ranked, checkpoint="c6", metrics=ranked[-1][1])
    assert best_checkpoint(result)[0] == "c6"
    ranked[3][1]["eval_score"] = 0.6
    assert best_checkpoint(result)[0] == "c4"
    unscored = SimpleNamespace(best_checkpoints=[("c3", {"step": 3})], checkpoint="c3", metrics={"step": 3})
    assert best_checkpoint(unscored)[0] == "c3"  # no evaluations: the latest


def test_worker_config_round_trip():
    cfg = load_config(None, ["train.steps=7", "eval.every=3"])
    wc = WorkerConfig(cfg, "sqlite:///x.db", "abc", "planner-abc", refresher="r", class_models={1: 2, 3: 0})
    back = WorkerConfig.from_dict(wc.to_dict())
    assert back == wc and back.cfg.train.steps == 7 and back.class_models == {1: 2, 3: 0}


def test_eval_keys_are_validated():
    with pytest.raises(ConfigError, match="eval.metric"):
        load_config(None, ["eval.metric=recall@3"])
    assert load_config(None, ["eval.ks=[1,3]", "eval.metric=recall@3"]).eval.metric == "recall@3"
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(None, ["eval.every=-1"])
    with pytest.raises(ConfigError, match="data.decode_device.*scaling.use_gpu"):
        load_config(None, ["data.decode_device=cuda"])


def test_workers_get_absolute_shard_paths(tmp_path, monkeypatch):
    from pipeline.train.driver import worker_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.train=data/qs/train", "data.eval=data/qs/holdout", "eval.data=s3://b/val"])
    w = worker_config(cfg)
    assert w.data.train == str(tmp_path / "data/qs/train") and w.data.eval == str(tmp_path / "data/qs/holdout")
    assert w.eval.data == "s3://b/val" and w.data.exemplars == "" and cfg.data.eval == "data/qs/holdout"
