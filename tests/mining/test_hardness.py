"""batch_hardness against explicit loops over tiny batches."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.mining.hardness import batch_hardness


def reference(emb, labels, margin):
    z = [e / e.norm() for e in emb.double()]

    def cos(i, j):
        return float(z[i] @ z[j])

    n = len(labels)
    hardest, viol, trip = [], 0, 0
    for a in range(n):
        negs = [j for j in range(n) if labels[j] != labels[a]]
        if negs:
            hardest.append(max(cos(a, j) for j in negs))
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for q in negs:
                trip += 1
                viol += cos(a, q) + margin > cos(a, p)
    return {"hardest_neg_sim_mean": sum(hardest) / len(hardest), "hardest_neg_sim_max": max(hardest),
            "violation_frac": viol / trip}


@pytest.mark.parametrize("seed,m", [(0, 2), (1, 3), (2, 2)])
def test_matches_loops(seed, m):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(5).repeat_interleave(m)
    emb = torch.randn(len(labels), 4, generator=g) * 3
    got = batch_hardness(emb, labels, margin=0.1)
    want = reference(emb, labels, 0.1)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k


def test_no_negative_is_nan_and_shapes_checked():
    out = batch_hardness(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert all(math.isnan(v) for v in out.values())
    with pytest.raises(ValueError, match="labels"):
        batch_hardness(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
