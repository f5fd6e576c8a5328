"""Cross-rank view of a batch: gather embeddings so negatives span every rank's batch.

The scaling rule, used by every loss in this package:

A loss is a global mean ``L = S / C`` over terms (one per anchor, pair or triplet),
where ``C`` is the number of terms in the concatenated (global) batch. Rank ``r``
owns the terms whose anchor is one of its own rows and returns
``L_r = W * S_r / C`` (``W`` = world size, ``S_r`` = sum of its own terms), which is
what :meth:`GlobalBatch.share_of_mean` computes.

* Values: ``mean_r L_r = L``, so averaging the logged loss over ranks gives the global loss.
* Gradients: the gather's backward sums, over all ranks, the gradient that each rank's
  ``L_r`` sends to rank ``q``'s rows, so rank ``q``'s embeddings receive
  ``sum_r dL_r/dx_q = W * dL/dx_q``. DDP then averages parameter gradients over ranks,
  ``(1/W) sum_q J_q^T (W dL/dx_q) = dL/dtheta``: the gradient of the global loss.
  Terms that touch only a rank's own rows (the L2 regulariser) follow the same rule.

With equal local batches ``W / C`` is just ``1 / (own count)`` for per-anchor means,
so the per-rank loss looks like a local mean; the rule matters for pair and triplet
counts, which are not split evenly across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class GlobalBatch:
    """Embeddings and labels of the global batch, and which rows this rank owns."""

    embeddings: torch.Tensor
    """(W * B, d): every rank's rows, rank r's at ``[r * B, (r + 1) * B)``; carries gradients."""
    labels: torch.Tensor
    """(W * B,): labels in the same order."""
    own: slice
    """This rank's rows of ``embeddings`` and ``labels``."""
    world_size: int
    """W; 1 when nothing was gathered."""

    def share_of_mean(self, own_sum: torch.Tensor, global_count: int | float) -> torch.Tensor:
        """Return this rank's share ``W * own_sum / global_count`` of a global mean.

        ``own_sum`` sums the terms anchored on this rank's rows; ``global_count`` counts
        the terms of the whole global batch (see the module docstring for why).
        """
        return own_sum * (self.world_size / global_count)


def is_cross_rank_active(cross_rank: bool) -> bool:
    """Return True when ``cross_rank`` is asked for and a process group of >1 rank exists."""
    return bool(cross_rank) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor, cross_rank: bool) -> GlobalBatch:
    """Return the global batch; a no-op view of the local batch unless cross-rank is active.

    Every rank must call this (it runs collectives) and, when ``cross_rank`` is active,
    every rank must also call backward on a loss built from it.
    Raises ValueError when ranks hold local batches of different sizes.
    """
    n = embeddings.shape[0]
    labels = labels.to(embeddings.device)  # NCCL gathers only GPU tensors; the masks need one device
    if not is_cross_rank_active(cross_rank):
        return GlobalBatch(embeddings, labels, slice(0, n), 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = all_gather_rows(torch.tensor([n, embeddings.shape[1]], device=embeddings.device))
    if not bool((sizes.view(world, 2) == sizes[:2]).all()):
        raise ValueError(
            f"cross_rank loss needs the same batch shape on every rank, got (rows, dim) per rank "
            f"{sizes.view(world, 2).tolist()}; give each rank the same number of classes and images"
        )
    return GlobalBatch(
        embeddings=_AllGatherWithGrad.apply(embeddings),
        labels=all_gather_rows(labels),
        own=slice(rank * n, (rank + 1) * n),
        world_size=world,
    )


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, without autograd (a collective)."""
    # The list form: all_gather_into_tensor warns as deprecated on every call in torch 2.14.
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sends each rank the sum over ranks of its rows' gradients.

    Written here rather than using ``torch.distributed.nn.functional.all_gather``, which is
    deprecated in torch 2.14 and warns on every call; the semantics are the same (its
    backward is a reduce-scatter with SUM). The backward uses all_reduce + slice because
    every backend (gloo included) has all_reduce; the gradient is only (W * B, d), small.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - autograd hook
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return all_gather_rows(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102 - autograd hook
        # clone: autograd may hand the same buffer to other consumers, all_reduce is in place
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows]
