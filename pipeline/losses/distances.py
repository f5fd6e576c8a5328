"""Pairwise squared Euclidean distances, shared by the distance-based losses."""

from __future__ import annotations

import torch


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the (n, m) matrix of ``||a_i - b_j||^2`` for a (n, d) and b (m, d).

    Uses ``|a|^2 + |b|^2 - 2 a.b`` (one matmul, no (n, m, d) tensor); rounding can make
    it slightly negative, hence the clamp. Its absolute error grows with the norms, so
    distances much smaller than ``eps * |a|^2`` are noise.
    """
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2.0 * (a @ b.T)
    return d2.clamp_min(0.0)
