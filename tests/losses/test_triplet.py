import pytest
import torch

from pipeline.losses import TripletLoss

from .reference_check import assert_matches_reference, labelled_batch


def squared_distance_reference(x, y):
    return sum((x[k] - y[k]) ** 2 for k in range(len(x)))


def triplet_reference(emb, labels, margin, pick=None):
    """Mean over triplets (a, p, n) of max(0, d(a,p) - d(a,n) + margin), d = squared L2.

    Every valid triplet by default; ``pick(i, negatives)`` chooses the negatives of the i-th
    (anchor, positive) pair in row-major order instead.
    """
    b = len(labels)
    total, count, i = torch.zeros((), dtype=emb.dtype), 0, 0
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            negatives = [n for n in range(b) if labels[n] != labels[a]]
            for n in (pick(i, negatives) if pick else negatives):
                d_ap = squared_distance_reference(emb[a], emb[p])
                d_an = squared_distance_reference(emb[a], emb[n])
                total = total + torch.clamp(d_ap - d_an + margin, min=0.0)
                count += 1
            i += 1
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


# --- one negative per (anchor, positive) pair: Sohn 2016's triplet baseline ---


def one_negative_reference(emb, labels, margin, u):
    """The i-th (anchor, positive) pair's negative: the floor(u[i] * k)-th of its anchor's k negatives."""
    return triplet_reference(emb, labels, margin, lambda i, negs: [negs[min(int(u[i] * len(negs)), len(negs) - 1)]])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "n_classes,per_class,dim,repeated_class,singletons",
    [(2, 2, 3, False, 0), (3, 3, 4, True, 1), (5, 2, 6, True, 2)],
)
def test_one_negative_matches_loop_reference(seed, n_classes, per_class, dim, repeated_class, singletons):
    emb, labels = labelled_batch(
        seed, n_classes, per_class, dim, repeated_class=repeated_class, singletons=singletons, shuffle=True
    )
    pairs = int(sum((labels == y).sum() - 1 for y in labels))
    u = torch.rand(pairs, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    value = assert_matches_reference(
        lambda e: TripletLoss(margin=2.0, negatives="one", seed=seed + 10)(e, labels),
        lambda e: one_negative_reference(e, labels, 2.0, u),
        emb,
    )
    assert value > 0


def test_one_negative_draws_are_valid_and_uniform():
    from pipeline.losses.triplet import draw_one_negative

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])  # anchor 0's negatives: rows 2..8 (7 of them)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(labels))
    for _ in range(7000):
        anchor, pos, neg = draw_one_negative(labels, slice(0, len(labels)), gen)
        assert len(anchor) == 2 * 1 * 3 + 3 * 2  # ordered positive pairs
        assert bool((labels[anchor] == labels[pos]).all() and (anchor != pos).all())
        assert bool((labels[neg] != labels[anchor]).all())
        counts += torch.bincount(neg[anchor == 0], minlength=len(labels))
    assert counts[:2].sum() == 0
    # 7000 draws over 7 negatives: 1000 expected each; a 5-sigma band (sd ~ 30)
    assert bool(((counts[2:] - 1000).abs() < 150).all()), counts


def test_one_negative_expectation_is_the_batch_all_loss():
    # equal class sizes: every anchor has the same number of negatives, so the mean over
    # draws of the one-negative loss is the batch-all mean
    emb, labels = labelled_batch(3, 4, 2, 5, shuffle=True, scale=0.3)
    emb = emb.detach()
    all_value = float(TripletLoss(margin=0.5)(emb, labels))
    loss = TripletLoss(margin=0.5, negatives="one", seed=1)
    draws = torch.stack([loss(emb, labels) for _ in range(4000)])
    assert abs(float(draws.mean()) - all_value) < 4 * float(draws.std()) / 4000**0.5 + 1e-12
    assert float(draws.std()) > 0  # the draw does change the value


def test_one_negative_own_rows_match_the_whole_batch():
    # a rank owning rows [4, 8) draws the same negatives for them as one process over all rows
    from pipeline.losses.triplet import draw_one_negative

    labels = torch.tensor([5, 5, 1, 1, 7, 7, 2, 2])
    whole = draw_one_negative(labels, slice(0, 8), torch.Generator().manual_seed(3))
    part = draw_one_negative(labels, slice(4, 8), torch.Generator().manual_seed(3))
    keep = whole[0] >= 4
    for w, p in zip(whole, part):
        assert torch.equal(w[keep], p)


def test_bad_negatives_is_an_error():
    with pytest.raises(ValueError, match="negatives must be one of all, one"):
        TripletLoss(negatives="hardest")
