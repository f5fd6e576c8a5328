import math

import pytest
import torch

from pipeline.losses import ContrastiveLoss

from .reference_check import assert_matches_reference, labelled_batch


def contrastive_reference(emb, labels, margin):
    """Mean over unordered pairs i < j of d^2 (same label) or max(0, margin - d)^2 (different)."""
    b = len(labels)
    total, count = torch.zeros((), dtype=emb.dtype), 0
    for i in range(b):
        for j in range(i + 1, b):
            d2 = sum((emb[i, k] - emb[j, k]) ** 2 for k in range(emb.shape[1]))
            if labels[i] == labels[j]:
                total = total + d2
            else:
                total = total + torch.clamp(margin - torch.sqrt(d2), min=0.0) ** 2
            count += 1
    assert count == b * (b - 1) // 2 == math.comb(b, 2)
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "n_classes,per_class,dim,repeated_class,singletons",
    [(2, 2, 3, False, 0), (3, 3, 4, True, 1), (5, 2, 8, True, 2)],
)
@pytest.mark.parametrize("margin", [1.0, 3.0])
def test_matches_loop_reference(seed, n_classes, per_class, dim, repeated_class, singletons, margin):
    emb, labels = labelled_batch(
        seed, n_classes, per_class, dim, repeated_class=repeated_class, singletons=singletons, shuffle=True
    )
    assert_matches_reference(
        lambda e: ContrastiveLoss(margin=margin)(e, labels),
        lambda e: contrastive_reference(e, labels, margin),
        emb,
    )


def test_coinciding_negatives_have_finite_gradient():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = ContrastiveLoss(margin=1.0)(emb, torch.tensor([0, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
