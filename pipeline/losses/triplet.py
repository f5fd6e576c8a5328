"""Triplet loss with a margin on squared L2 distances, over all valid triplets of the batch.

L = mean over valid triplets (a, p, n) of max(0, ||f_a - f_p||^2 - ||f_a - f_n||^2 + margin),
where a valid triplet has p != a, y_p == y_a and y_n != y_a. The mean counts every valid
triplet, including those already satisfied (loss 0), so the scale does not depend on how
many are hard.
"""

from __future__ import annotations

import torch

from pipeline.losses.base import BatchLoss
from pipeline.losses.distances import squared_distances
from pipeline.losses.distributed import GlobalBatch
from pipeline.losses.pairs import triplet_count


class TripletLoss(BatchLoss):
    """Batch-all triplet loss; see the module docstring. Default margin 0.2 (FaceNet's)."""

    DEFAULT_MARGIN = 0.2

    def __init__(self, margin: float = DEFAULT_MARGIN, cross_rank: bool = False):
        super().__init__(cross_rank=cross_rank)
        if margin < 0:
            raise ValueError(f"TripletLoss: margin must be >= 0, got {margin}")
        self.margin = margin

    def compute(self, batch: GlobalBatch) -> torch.Tensor:
        """Return this rank's share of the mean hinge over all valid triplets.

        Raises ValueError when no class has two images (no valid triplet).
        """
        emb, labels = batch.embeddings, batch.labels
        n_triplets = triplet_count(labels)
        if n_triplets == 0:
            raise ValueError(
                "TripletLoss: no valid triplet in the batch: needs a class with at least 2 images "
                "(anchor, positive) and another class (negative)"
            )
        own = torch.arange(batch.own.start, batch.own.stop, device=emb.device)
        d2 = squared_distances(emb[own], emb)  # (n, B)
        same = labels[own, None] == labels[None, :]
        positive = same.clone()
        positive[torch.arange(len(own), device=emb.device), own] = False

        # For anchor a and x = d(a, p) + margin, sum_n max(0, x - d(a, n)) only involves the
        # k negatives closer than x: k * x - (sum of those k distances). Sorting each anchor's
        # negative distances gives k by binary search and the sum as a prefix sum, so the
        # loss costs O(B^2 log B) time and memory instead of an (n, B, B) tensor of triplets.
        negative_d2, _ = d2.masked_fill(same, float("inf")).sort(dim=1)  # non-negatives last
        prefix = torch.cat([d2.new_zeros(len(own), 1), negative_d2.cumsum(dim=1)], dim=1)
        x = d2 + self.margin  # (n, B): one entry per candidate positive
        k = torch.searchsorted(negative_d2.detach(), x.detach())  # negatives with d(a, n) < x
        hinge_sums = k * x - prefix.gather(1, k)
        return batch.share_of_mean(torch.where(positive, hinge_sums, 0.0).sum(), n_triplets)
