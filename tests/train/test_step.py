"""The training step on the CPU, without Ray: schedules, precision, clipping, weight-decay groups, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.losses import build_loss
from pipeline.models import build_model
from pipeline.train.step import MetricObjective, TrainStep, lr_factor, make_optimizer, make_scheduler, param_groups


def _cfg(*overrides):
    return load_config(None, ["train.steps=100", "train.lr=0.1", *overrides])


@pytest.mark.parametrize(("overrides", "expected"), [
    ((), lambda s: 1.0),
    (("train.warmup_steps=10",), lambda s: (s + 1) / 10 if s < 10 else 1.0),
    (("train.lr_schedule=cosine",), lambda s: 0.5 * (1 + math.cos(math.pi * s / 100))),
    (("train.lr_schedule=cosine", "train.warmup_steps=20"),
     lambda s: (s + 1) / 20 if s < 20 else 0.5 * (1 + math.cos(math.pi * (s - 20) / 80))),
    (("train.lr_schedule=step", "train.lr_milestones=[30,60]", "train.lr_gamma=0.5"),
     lambda s: 1.0 if s < 30 else 0.5 if s < 60 else 0.25),
    (("train.lr_schedule=step", "train.lr_milestones=[50]", "train.warmup_steps=5"),
     lambda s: (s + 1) / 5 if s < 5 else 1.0 if s < 50 else 0.1),
])
def test_each_schedule_gives_its_formula_at_every_step_and_the_scheduler_follows_it(overrides, expected):
    cfg = _cfg(*overrides)
    for s in (0, 1, 4, 5, 9, 10, 19, 20, 29, 30, 49, 50, 59, 60, 99):
        assert lr_factor(cfg.train, s) == pytest.approx(expected(s), abs=1e-12), s
    opt = make_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = make_scheduler(cfg, opt)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])  # what this step's update uses
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * expected(s) for s in range(100)], abs=1e-12)


def test_weight_decay_skips_biases_and_normalisation_weights():
    model = build_model(ModelConfig(backbone="tiny", embedding_dim=16, head="linear_bn"))
    decay, no_decay = param_groups(model, 5e-4)
    one_d = {id(p) for p in model.parameters() if p.ndim < 2}
    norm = {id(p) for m in model.modules() if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm))
            for p in m.parameters()}
    assert norm and norm <= one_d
    assert {id(p) for p in no_decay["params"]} == one_d and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters()} - one_d
    assert decay["weight_decay"] == 5e-4 and all(p.ndim >= 2 for p in decay["params"])
    opt = make_optimizer(_cfg("train.optimizer=adam", "train.weight_decay=0.01"), model)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def _batch(seed=0, n=8, size=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 255, (n, size, size, 3), dtype=torch.uint8, generator=g),
            torch.arange(n // 2).repeat_interleave(2))


def _step(precision="fp32", grad_clip=0.0, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone="tiny", embedding_dim=16))
    cfg = _cfg(f"train.grad_clip={grad_clip}")
    opt = make_optimizer(cfg, model)
    return model, TrainStep(model, MetricObjective(build_loss("npair_mc")), opt, make_scheduler(cfg, opt),
                            precision=precision, grad_clip=grad_clip)


def test_bf16_step_gives_the_fp32_loss_within_tolerance():
    images, labels = _batch()
    _, fp32 = _step("fp32")
    _, bf16 = _step("bf16")
    emb32, emb16 = fp32(images, labels), bf16(images, labels)
    assert emb16.dtype == torch.bfloat16 and emb32.dtype == torch.float32
    l32, l16 = fp32.read()["train/loss"], bf16.read()["train/loss"]
    assert math.isfinite(l16) and l16 == pytest.approx(l32, rel=0.02), (l32, l16)


def test_gradient_clipping_bounds_the_global_norm():
    images, labels = _batch(seed=1)
    model, step = _step(grad_clip=1e-3)
    seen = {}

    def grab(*_):  # the gradients the optimizer is about to apply
        seen["norm"] = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))

    step.optimizer.register_step_pre_hook(grab)
    step(images, labels)
    before = step.read()["train/grad_norm"]
    assert before > 1e-3  # the unclipped norm is far larger: clipping had work to do
    assert float(seen["norm"]) == pytest.approx(1e-3, rel=1e-3)


def test_read_is_the_mean_of_the_steps_since_the_last_read():
    images, labels = _batch(seed=2)
    _, step = _step()
    # The same updates, one at a time, with the loss read after each (the reference).
    _, ref_step = _step()
    ref = []
    for _ in range(3):
        ref_step(images, labels)
        ref.append(ref_step.read()["train/loss"])
    for _ in range(3):
        step(images, labels)
    got = step.read()
    assert got["train/loss"] == pytest.approx(sum(ref) / 3, rel=1e-6) and step.read() == {}


def test_a_restored_scheduler_continues_the_uninterrupted_lr_sequence():
    cfg = _cfg("train.lr_schedule=cosine", "train.warmup_steps=10")

    def run(opt, sched, n):
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    model = torch.nn.Linear(3, 3)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    whole = run(opt, sched, 100)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    first = run(opt, sched, 37)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # as a checkpoint is read back
    opt2 = make_optimizer(cfg, model)
    sched2 = make_scheduler(cfg, opt2)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert first + run(opt2, sched2, 63) == pytest.approx(whole, abs=1e-15)


def test_bad_schedule_and_precision_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.precision.*fp16 needs scaling.use_gpu"):
        _cfg("train.precision=fp16")
    with pytest.raises(ConfigError, match="train.lr_milestones"):
        _cfg("train.lr_schedule=step", "train.lr_milestones=[60,30]")
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        _cfg("train.warmup_steps=-1")
    short = _cfg("train.steps=5", "train.warmup_steps=180", "train.lr_schedule=cosine")  # a real config, shortened
    assert [lr_factor(short.train, s) for s in range(5)] == pytest.approx([(s + 1) / 180 for s in range(5)])
    with pytest.raises(ConfigError, match="train.lr_schedule.*cosine"):
        _cfg("train.lr_schedule=cosin")
