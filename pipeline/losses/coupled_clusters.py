"""Coupled clusters loss (Liu et al., CVPR 2016, "Deep Relative Distance Learning").

For each identity with a positive set P of >= 2 images in the batch:
    c   = mean of f(P)                                  (the cluster centre)
    x*n = the image of another identity nearest to c    (chosen without gradient;
                                                          ties -> the first row)
    L_id = sum_{p in P} 1/2 max(0, ||f(p) - c||^2 + alpha - ||f(x*n) - c||^2)
L = mean of L_id over the identities with >= 2 images (identities with one image are
skipped). Gradients flow through f(p), c and f(x*n). ``margin`` is alpha.
"""

from __future__ import annotations

import torch

from pipeline.losses.base import BatchLoss
from pipeline.losses.distances import squared_distances
from pipeline.losses.distributed import GlobalBatch


class CoupledClustersLoss(BatchLoss):
    """Coupled clusters loss; see the module docstring. Default margin (alpha) 1.0."""

    DEFAULT_MARGIN = 1.0

    def __init__(self, margin: float = DEFAULT_MARGIN, cross_rank: bool = False):
        super().__init__(cross_rank=cross_rank)
        if margin < 0:
            raise ValueError(f"CoupledClustersLoss: margin must be >= 0, got {margin}")
        self.margin = margin

    def compute(self, batch: GlobalBatch) -> torch.Tensor:
        """Return this rank's share of the mean over identities of L_id.

        Raises ValueError when no identity has at least 2 images.
        """
        emb, labels = batch.embeddings, batch.labels
        _, identity, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
        n_identities = int((sizes >= 2).sum())
        if n_identities == 0:
            raise ValueError(
                "CoupledClustersLoss: no identity has at least 2 images in the batch; "
                "sample >= 2 images per class"
            )
        # every rank computes all centres and nearest negatives from the same global batch;
        # a rank's own images then pick up the terms of their identity. Centres come from a
        # matmul, not index_add (atomic adds in any order on GPU), so that ranks agree on
        # the nearest negative even in near-ties.
        members = identity[None, :] == torch.arange(len(sizes), device=emb.device)[:, None]  # (ids, B)
        centres = (members.to(emb.dtype) @ emb) / sizes[:, None].to(emb.dtype)
        with torch.no_grad():
            to_centre = squared_distances(centres, emb)
            nearest_negative = to_centre.masked_fill(members, float("inf")).argmin(dim=1)
        negative_d2 = (emb[nearest_negative] - centres).pow(2).sum(1)  # (identities,)

        own = torch.arange(batch.own.start, batch.own.stop, device=emb.device)
        own_identity = identity[own]
        positive_d2 = (emb[own] - centres[own_identity]).pow(2).sum(1)
        terms = 0.5 * (positive_d2 + self.margin - negative_d2[own_identity]).clamp_min(0.0)
        counted = sizes[own_identity] >= 2
        return batch.share_of_mean(torch.where(counted, terms, 0.0).sum(), n_identities)
