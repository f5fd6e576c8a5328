"""Sohn's (N+1)-tuplet loss (NIPS 2016) on a batch of M >= 2 images per class.

Every ordered pair (a, p) with p != a and y_p == y_a is an (anchor, positive); its
negatives are all rows of the batch with another label (so same-class rows are never
negatives). The term of a pair is

    log(1 + sum_{n: y_n != y_a} exp(f_a.f_n - f_a.f_p)),

and L = mean over all such pairs + ``l2_reg`` * mean squared norm of all embeddings.
Unlike ``npair_mc`` (negatives = the other classes' *positives* f_j+ only, one anchor per
class), every image is an anchor and every other-class image is a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import BatchLoss
from pipeline.losses.distributed import GlobalBatch
from pipeline.losses.pairs import positive_pair_count


class TupletLoss(BatchLoss):
    """(N+1)-tuplet loss over all (anchor, positive) pairs; see the module docstring."""

    def __init__(self, l2_reg: float = 0.002, cross_rank: bool = False):
        super().__init__(cross_rank=cross_rank)
        if l2_reg < 0:
            raise ValueError(f"TupletLoss: l2_reg must be >= 0, got {l2_reg}")
        self.l2_reg = l2_reg

    def compute(self, batch: GlobalBatch) -> torch.Tensor:
        """Return this rank's share of the mean tuplet term (+ L2 term).

        Raises ValueError when no class has two images (no anchor-positive pair).
        """
        emb, labels = batch.embeddings, batch.labels
        n_pairs = positive_pair_count(labels)
        if n_pairs == 0:
            raise ValueError("TupletLoss: no (anchor, positive) pair: needs a class with at least 2 images")
        own = torch.arange(batch.own.start, batch.own.stop, device=emb.device)
        sims = emb[own] @ emb.T  # (n, B)
        same = labels[own, None] == labels[None, :]
        positive = same.clone()
        positive[torch.arange(len(own), device=emb.device), own] = False
        # log(1 + sum_n exp(s_an - s_ap)) = softplus(logsumexp_n(s_an) - s_ap); every anchor has a
        # negative (BatchLoss checked for 2 classes), so the logsumexp is finite
        lse_negatives = torch.logsumexp(sims.masked_fill(same, float("-inf")), dim=1)
        terms = F.softplus(lse_negatives[:, None] - sims)
        loss = batch.share_of_mean(torch.where(positive, terms, 0.0).sum(), n_pairs)
        if self.l2_reg:
            loss = loss + self.l2_reg * batch.share_of_mean(emb[own].pow(2).sum(), labels.numel())
        return loss
