"""GlobalBatchNorm: one process's BatchNorm over the concatenated batch, split across 2 gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import build_model
from pipeline.models.global_batch_norm import GlobalBatchNorm, to_global_batch_norm

WORLD = 2
ROWS = (3, 5)  # ranks hold different batch sizes: the statistics weigh rows, not ranks
TOL = dict(rtol=1e-9, atol=1e-12)


def inputs(shape_tail):
    gen = torch.Generator().manual_seed(11)
    x = 2.0 + 3.0 * torch.randn(sum(ROWS), *shape_tail, generator=gen, dtype=torch.float64)
    w = torch.randn(sum(ROWS), *shape_tail, generator=gen, dtype=torch.float64)  # loss weights per output
    return x, w


def reference(bn, x, w, steps):
    """One process: ``bn`` on the whole batch for ``steps`` steps (running stats move each step)."""
    x = x.clone().requires_grad_()
    for _ in range(steps):
        out = bn(x)
    (out * w).sum().backward()
    return out.detach(), x.grad, bn.weight.grad, bn.bias.grad


def make_bn(channels, cls, momentum):
    bn = cls(channels, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-1, 1, channels))
    return bn


def check(rank, shape_tail, plain_cls, momentum, steps):
    x, w = inputs(shape_tail)
    channels = shape_tail[0]
    own = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
    ref_bn = make_bn(channels, plain_cls, momentum)
    ref_out, ref_xgrad, ref_wgrad, ref_bgrad = reference(ref_bn, x, w, steps)

    bn = to_global_batch_norm(make_bn(channels, plain_cls, momentum))
    assert isinstance(bn, GlobalBatchNorm)
    x_r = x[own].clone().requires_grad_()
    for _ in range(steps):
        out = bn(x_r)
    (out * w[own]).sum().backward()  # this rank's share of the global loss; DDP sums what follows
    wgrad, bgrad = bn.weight.grad.clone(), bn.bias.grad.clone()
    dist.all_reduce(wgrad)
    dist.all_reduce(bgrad)
    torch.testing.assert_close(out.detach(), ref_out[own], **TOL)
    torch.testing.assert_close(x_r.grad, ref_xgrad[own], **TOL)
    torch.testing.assert_close(wgrad, ref_wgrad, **TOL)
    torch.testing.assert_close(bgrad, ref_bgrad, **TOL)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, **TOL)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, **TOL)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == steps
    # per-rank statistics would differ: the check above can fail
    per_rank = make_bn(channels, plain_cls, momentum)(x[own])
    assert not torch.allclose(per_rank, ref_out[own], atol=1e-3)
    # eval mode: the running statistics, no collective (only this rank calls it)
    if rank == 0:
        torch.testing.assert_close(bn.eval()(x), ref_bn.eval()(x), **TOL)


def small_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)).double()


def check_under_ddp(rank):
    """Wrapped in DDP (its gradient all-reduces interleave with the layer's own collectives in
    backward), the averaged gradient is the one process's gradient of the mean rank loss."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(sum(ROWS), 3, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(sum(ROWS), 2, generator=gen, dtype=torch.float64)
    own = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
    ref = small_net()
    ((ref(x) * w).sum() / WORLD).backward()
    ddp = DDP(to_global_batch_norm(small_net()))
    for _ in range(2):  # the second step checks that nothing is left pending after the first
        ddp.zero_grad()
        (ddp(x[own]) * w[own]).sum().backward()
    for (name, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"{name}: {m}")


def worker(rank, init_file):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        check(rank, (4, 3, 5), nn.BatchNorm2d, 0.1, steps=2)
        check(rank, (6,), nn.BatchNorm1d, None, steps=3)  # cumulative running averages
        check_under_ddp(rank)
    finally:
        dist.destroy_process_group()


def test_global_batch_norm_is_batch_norm_over_the_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_without_a_process_group_it_is_batch_norm():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    plain = nn.BatchNorm2d(4).double()
    ours = to_global_batch_norm(nn.BatchNorm2d(4).double())
    torch.testing.assert_close(ours(x), plain(x))
    torch.testing.assert_close(ours.running_var, plain.running_var)


def test_sync_batch_converts_every_batch_norm_and_keeps_the_checkpoint_keys():
    plain = build_model(ModelConfig(backbone="tiny", embedding_dim=8, head="linear_bn", norm="batch"))
    synced = build_model(ModelConfig(backbone="tiny", embedding_dim=8, head="linear_bn", norm="sync_batch"))
    kinds = [type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds and set(kinds) == {GlobalBatchNorm}
    assert len(kinds) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert synced.state_dict().keys() == plain.state_dict().keys()
    synced.load_state_dict(plain.state_dict())  # weights move between the two settings
    with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\) input"):
        to_global_batch_norm(nn.BatchNorm1d(3))(torch.randn(3))
