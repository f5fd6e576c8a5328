"""Contrastive loss (Hadsell et al. 2006, without their 1/2) over all pairs of the batch.

For every pair i != j with d = ||f_i - f_j||:  d^2 if y_i == y_j, else max(0, margin - d)^2.
L = mean over all pairs (ordered and unordered give the same mean: the term is symmetric).
"""

from __future__ import annotations

import torch

from pipeline.losses.base import BatchLoss
from pipeline.losses.distances import squared_distances
from pipeline.losses.distributed import GlobalBatch


class ContrastiveLoss(BatchLoss):
    """Margin contrastive loss over all pairs; see the module docstring. Default margin 1.0."""

    DEFAULT_MARGIN = 1.0

    def __init__(self, margin: float = DEFAULT_MARGIN, cross_rank: bool = False):
        super().__init__(cross_rank=cross_rank)
        if margin < 0:
            raise ValueError(f"ContrastiveLoss: margin must be >= 0, got {margin}")
        self.margin = margin

    def compute(self, batch: GlobalBatch) -> torch.Tensor:
        """Return this rank's share of the mean pair term over the global batch."""
        emb, labels = batch.embeddings, batch.labels
        b = labels.numel()
        own = torch.arange(batch.own.start, batch.own.stop, device=emb.device)
        d2 = squared_distances(emb[own], emb)  # (n, B)
        same = labels[own, None] == labels[None, :]
        not_self = torch.ones_like(same)
        not_self[torch.arange(len(own), device=emb.device), own] = False
        # sqrt has an infinite slope at 0: clamping to the smallest normal keeps the gradient
        # finite for coinciding points and changes d by < 1e-19
        dist = d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt()
        push = (self.margin - dist).clamp_min(0.0).pow(2)
        terms = torch.where(same, d2, push)
        return batch.share_of_mean(torch.where(not_self, terms, 0.0).sum(), b * (b - 1))
