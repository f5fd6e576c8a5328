"""Triplet loss with a margin on squared L2 distances: all valid triplets, or one negative per pair.

L = mean over triplets (a, p, n) of max(0, ||f_a - f_p||^2 - ||f_a - f_n||^2 + margin),
where p != a, y_p == y_a and y_n != y_a. Two sets of triplets:

* ``negatives="all"`` (batch-all): every valid triplet of the batch. The mean counts every
  one, including those already satisfied (loss 0), so the scale does not depend on how many
  are hard. A strong baseline: each (anchor, positive) pair meets all B - M negatives.
* ``negatives="one"`` (Sohn 2016's triplet baseline): each ordered (anchor, positive) pair
  gets one negative, drawn uniformly from the batch's rows of other classes, so a pair is
  compared with one negative per update, as in the paper's comparison of triplet with
  N-pair-ovo and N-pair-mc on the same N-pair batches. The draw comes from the loss's own
  seeded generator and is made for every pair of the *global* batch on every rank (one
  uniform number per pair, in row order), so ranks agree and a cross-rank loss equals the
  single-process loss on the concatenated batch. Its expectation over the draw equals the
  batch-all loss when all classes in the batch have the same size (every anchor then has the
  same number of negatives). The generator is not checkpointed: a resumed run draws anew
  from ``seed``.
"""

from __future__ import annotations

from typing import Literal

import torch

from pipeline.losses.base import BatchLoss
from pipeline.losses.distances import squared_distances
from pipeline.losses.distributed import GlobalBatch
from pipeline.losses.pairs import positive_pair_count, triplet_count

NEGATIVES = ("all", "one")


class TripletLoss(BatchLoss):
    """Triplet loss; see the module docstring. Default margin 0.2 (FaceNet's), all negatives."""

    DEFAULT_MARGIN = 0.2

    def __init__(
        self,
        margin: float = DEFAULT_MARGIN,
        cross_rank: bool = False,
        negatives: Literal["all", "one"] = "all",
        seed: int = 0,
    ):
        super().__init__(cross_rank=cross_rank)
        if margin < 0:
            raise ValueError(f"TripletLoss: margin must be >= 0, got {margin}")
        if negatives not in NEGATIVES:
            raise ValueError(f"TripletLoss: negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        self.margin = margin
        self.negatives = negatives
        self.generator = torch.Generator().manual_seed(seed)  # CPU: the same draws on every device

    def compute(self, batch: GlobalBatch) -> torch.Tensor:
        """Return this rank's share of the mean hinge over the triplets.

        Raises ValueError when no class has two images (no valid triplet).
        """
        n_triplets = triplet_count(batch.labels)
        if n_triplets == 0:
            raise ValueError(
                "TripletLoss: no valid triplet in the batch: needs a class with at least 2 images "
                "(anchor, positive) and another class (negative)"
            )
        if self.negatives == "one":
            return self._one_negative(batch)
        return self._all_negatives(batch, n_triplets)

    def _all_negatives(self, batch: GlobalBatch, n_triplets: int) -> torch.Tensor:
        emb, labels = batch.embeddings, batch.labels
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

    def _one_negative(self, batch: GlobalBatch) -> torch.Tensor:
        emb, labels = batch.embeddings, batch.labels
        anchor, pos, neg = draw_one_negative(labels, batch.own, self.generator)
        a = emb[anchor]
        d_ap = (a - emb[pos]).pow(2).sum(dim=1)
        d_an = (a - emb[neg]).pow(2).sum(dim=1)
        hinge = torch.clamp(d_ap - d_an + self.margin, min=0.0)
        return batch.share_of_mean(hinge.sum(), positive_pair_count(labels))


def draw_one_negative(
    labels: torch.Tensor, own: slice, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (anchor, positive, negative) row indices of one triplet per ordered positive pair of ``own`` rows.

    Pairs are the (a, p), a != p, y_a == y_p with a in ``own``, in row-major order; each gets a
    negative drawn uniformly from the rows with another label. One uniform number is drawn
    from ``generator`` for every positive pair of the whole batch ``labels`` (not only
    ``own``'s), so callers that share a generator state draw the same negative for a pair
    whichever rows they own. Indices are int64 on ``labels``' device.
    """
    device = labels.device
    _, inverse, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    pairs_per_row = (sizes[inverse] - 1).cpu()
    u = torch.rand(int(pairs_per_row.sum()), generator=generator, dtype=torch.float64)
    start = int(pairs_per_row[: own.start].sum())
    u = u[start : start + int(pairs_per_row[own].sum())].to(device)

    rows = torch.arange(own.start, own.stop, device=device)
    same = labels[rows, None] == labels[None, :]  # (n, B)
    positive = same.clone()
    positive[torch.arange(len(rows), device=device), rows] = False
    local_anchor, pos = positive.nonzero(as_tuple=True)  # row-major: the order of ``u``
    negatives = ~same[local_anchor]  # (pairs, B)
    k = negatives.sum(dim=1)
    j = torch.minimum((u * k).long(), k - 1)  # the j-th negative (0-based) of the anchor, uniform
    neg = torch.searchsorted(negatives.long().cumsum(dim=1), (j + 1)[:, None]).squeeze(1)
    return rows[local_anchor], pos, neg
