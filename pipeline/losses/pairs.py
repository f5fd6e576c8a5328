"""Counts of (anchor, positive) pairs and triplets in a labelled batch, the denominators of global means.

They are computed from the (global) labels alone, so every rank gets the same count
without a collective, and raises the same error when a count is zero.
"""

from __future__ import annotations

import torch


def class_sizes(labels: torch.Tensor) -> torch.Tensor:
    """Return the number of rows of each distinct label (int64, one entry per label)."""
    return torch.unique(labels, return_counts=True)[1].to(torch.int64)


def positive_pair_count(labels: torch.Tensor) -> int:
    """Return the number of ordered pairs (a, p), a != p, with equal labels."""
    sizes = class_sizes(labels)
    return int((sizes * (sizes - 1)).sum())


def triplet_count(labels: torch.Tensor) -> int:
    """Return the number of triplets (a, p, n) with a != p, y_p == y_a and y_n != y_a."""
    sizes = class_sizes(labels)
    return int((sizes * (sizes - 1) * (labels.numel() - sizes)).sum())
