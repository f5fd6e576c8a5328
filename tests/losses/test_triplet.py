import pytest
import torch

from pipeline.losses import TripletLoss

from .reference_check import assert_matches_reference, labelled_batch


def squared_distance_reference(x, y):
    return sum((x[k] - y[k]) ** 2 for k in range(len(x)))


def triplet_reference(emb, labels, margin):
    """Mean over every valid (a, p, n) of max(0, d(a,p) - d(a,n) + margin), d = squared L2."""
    b = len(labels)
    total, count = torch.zeros((), dtype=emb.dtype), 0
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            for n in range(b):
                if labels[n] == labels[a]:
                    continue
                d_ap = squared_distance_reference(emb[a], emb[p])
                d_an = squared_distance_reference(emb[a], emb[n])
                total = total + torch.clamp(d_ap - d_an + margin, min=0.0)
                count += 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "n_classes,per_class,dim,repeated_class,singletons",
    [(2, 2, 3, False, 0), (3, 3, 4, True, 1), (4, 2, 6, True, 2)],
)
@pytest.mark.parametrize("margin", [0.2, 2.0])
def test_matches_loop_reference(seed, n_classes, per_class, dim, repeated_class, singletons, margin):
    emb, labels = labelled_batch(
        seed, n_classes, per_class, dim, repeated_class=repeated_class, singletons=singletons, shuffle=True
    )
    value = assert_matches_reference(
        lambda e: TripletLoss(margin=margin)(e, labels), lambda e: triplet_reference(e, labels, margin), emb
    )
    if margin == 2.0:
        assert value > 0  # some hinge is active, so the gradient check is not vacuous


def test_distance_ties_with_the_hinge_boundary():
    # points on a line: d(a,p) + margin equals some d(a,n) exactly, where max(0, .) has a kink
    emb = torch.tensor([[0.0], [1.0], [2.0], [-1.5], [3.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2])
    assert_matches_reference(
        lambda e: TripletLoss(margin=3.0)(e, labels), lambda e: triplet_reference(e, labels, 3.0), emb
    )


def test_no_positive_pair_is_an_error():
    with pytest.raises(ValueError, match="no valid triplet"):
        TripletLoss()(torch.randn(4, 3), torch.arange(4))
