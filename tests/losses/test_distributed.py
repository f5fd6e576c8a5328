"""Two gloo ranks: cross-rank losses reproduce the single-process loss on the concatenated batch.

Rank r owns rows [r*B, (r+1)*B) of a global batch that both ranks build from the same seed.
Embeddings are z @ theta, theta standing in for the model's shared parameters: DDP averages
theta's gradient over ranks, so all_reduce(theta.grad) / W must equal the gradient of the
global loss, and each rank's own rows z_r must receive W times the global gradient.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.losses import LOSS_NAMES, build_loss

from .test_contrastive import contrastive_reference
from .test_coupled_clusters import coupled_clusters_reference
from .test_npair import npair_reference
from .test_triplet import triplet_reference
from .test_tuplet import tuplet_reference

WORLD = 2
TOL = {"rtol": 1e-6, "atol": 1e-10}
# Per rank: 4 classes x 2 images; class 11 is on both ranks, and 12 twice on rank 1, so the
# label masking has to work across ranks and within one.
RANK_LABELS = [[11, 11, 3, 3, 4, 4, 5, 5], [11, 11, 12, 12, 6, 6, 12, 12]]
MARGINS = {"triplet": 2.0, "contrastive": 3.0, "coupled_clusters": 3.0}  # large: most hinges active


def local_reference(name, emb, labels):
    """The slow loop reference of loss ``name`` on one rank's rows alone."""
    margin = MARGINS.get(name)
    if name.startswith("npair"):
        return npair_reference(emb[0::2], emb[1::2], labels[0::2], name.removeprefix("npair_"), 0.002)
    return {
        "triplet": lambda: triplet_reference(emb, labels, margin),
        "tuplet": lambda: tuplet_reference(emb, labels, 0.002),
        "contrastive": lambda: contrastive_reference(emb, labels, margin),
        "coupled_clusters": lambda: coupled_clusters_reference(emb, labels, margin),
    }[name]()


def check_loss(name, rank, **extra):
    gen = torch.Generator().manual_seed(LOSS_NAMES.index(name))
    labels = torch.tensor(RANK_LABELS).flatten()
    b = len(RANK_LABELS[rank])
    own = slice(rank * b, (rank + 1) * b)
    z_all = torch.randn(len(labels), 6, generator=gen, dtype=torch.float64)
    theta_init = 0.4 * torch.randn(6, 5, generator=gen, dtype=torch.float64)

    # single process on the concatenated batch
    z_global, theta_global = z_all.clone().requires_grad_(), theta_init.clone().requires_grad_()
    global_loss = build_loss(name, margin=MARGINS.get(name), **extra)(z_global @ theta_global, labels)
    global_loss.backward()

    # this rank's share with cross_rank, then what DDP would do with it
    z_r, theta = z_all[own].clone().requires_grad_(), theta_init.clone().requires_grad_()
    loss_r = build_loss(name, margin=MARGINS.get(name), cross_rank=True, **extra)(z_r @ theta, labels[own])
    loss_r.backward()
    mean_loss, ddp_grad = loss_r.detach().clone(), theta.grad.clone()
    dist.all_reduce(mean_loss)
    dist.all_reduce(ddp_grad)
    torch.testing.assert_close(mean_loss / WORLD, global_loss.detach(), **TOL)
    torch.testing.assert_close(ddp_grad / WORLD, theta_global.grad, **TOL)
    torch.testing.assert_close(z_r.grad, WORLD * z_global.grad[own], **TOL)
    if extra:
        return

    # without cross_rank a rank sees only its local negatives
    emb_r = (z_all[own] @ theta_init).requires_grad_()
    local = build_loss(name, margin=MARGINS.get(name))(emb_r, labels[own])
    torch.testing.assert_close(local, local_reference(name, emb_r, labels[own]), **TOL)
    assert not torch.isclose(local, loss_r)


def worker(rank, init_file):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on loopback whatever the host's name resolves to
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name in LOSS_NAMES:
            check_loss(name, rank)
        # Sohn's one-negative triplet: every rank draws for the whole global batch, so the
        # cross-rank loss is the single process's (same seed), not just equal in expectation
        check_loss("triplet", rank, negatives="one", seed=5)
        # N-pair-mc on scaled cosines: normalised before the gather, the gradient reaches the owner
        check_loss("npair_mc", rank, scale=4.0)
        # ranks with different batch sizes: every rank raises (no hang)
        rows = 4 + 2 * rank
        with pytest.raises(ValueError, match="same batch shape on every rank"):
            build_loss("triplet", cross_rank=True)(torch.randn(rows, 3), torch.arange(rows) % 2)
    finally:
        dist.destroy_process_group()


def test_cross_rank_losses_match_the_concatenated_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
