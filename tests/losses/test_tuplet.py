import pytest
import torch

from pipeline.losses import NPairLoss, TupletLoss

from .reference_check import assert_matches_reference, labelled_batch


def tuplet_reference(emb, labels, l2_reg):
    """Mean over ordered (a, p), p != a, same label, of log(1 + sum_{n: other label} exp(f_a.f_n - f_a.f_p))."""
    b = len(labels)
    total, count = torch.zeros((), dtype=emb.dtype), 0
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            exp_sum = torch.zeros((), dtype=emb.dtype)
            for n in range(b):
                if labels[n] != labels[a]:
                    exp_sum = exp_sum + torch.exp(torch.dot(emb[a], emb[n]) - torch.dot(emb[a], emb[p]))
            total = total + torch.log(1 + exp_sum)
            count += 1
    return total / count + l2_reg * sum(torch.dot(emb[i], emb[i]) for i in range(b)) / b


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "n_classes,per_class,dim,repeated_class,singletons",
    [(2, 2, 3, False, 0), (3, 3, 4, True, 1), (5, 2, 8, True, 2)],
)
def test_matches_loop_reference(seed, n_classes, per_class, dim, repeated_class, singletons):
    emb, labels = labelled_batch(
        seed, n_classes, per_class, dim, repeated_class=repeated_class, singletons=singletons, shuffle=True
    )
    assert_matches_reference(
        lambda e: TupletLoss(l2_reg=0.05)(e, labels), lambda e: tuplet_reference(e, labels, 0.05), emb
    )


def test_uses_more_negatives_than_npair_mc():
    # same pairs, but the tuplet loss also counts the other classes' anchors as negatives
    emb, labels = labelled_batch(0, 4, 2, 6)
    tuplet = TupletLoss(l2_reg=0.0)(emb, labels)
    npair = NPairLoss("mc", l2_reg=0.0)(emb[0::2], emb[1::2], labels[0::2])
    assert not torch.isclose(tuplet, npair)


def test_no_positive_pair_is_an_error():
    with pytest.raises(ValueError, match="no \\(anchor, positive\\) pair"):
        TupletLoss()(torch.randn(4, 3), torch.arange(4))
