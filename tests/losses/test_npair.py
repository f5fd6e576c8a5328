import pytest
import torch

from pipeline.losses import NPairBatchLoss, NPairLoss

from .reference_check import assert_matches_reference, labelled_batch


def npair_reference(anchors, positives, labels, variant, l2_reg, scale=0.0):
    """Sohn's formulas with plain loops: a negative j of i is any j whose label differs.

    ``scale`` s > 0: the similarity is s a.p / (|a| |p|), the regulariser still on the raw rows.
    """
    n = len(labels)

    def sim(a, p):
        return torch.dot(a, p) if not scale else scale * torch.dot(a, p) / (a.norm() * p.norm())

    total = torch.zeros((), dtype=anchors.dtype)
    for i in range(n):
        s_ii = sim(anchors[i], positives[i])
        exp_sum = torch.zeros((), dtype=anchors.dtype)
        for j in range(n):
            if labels[j] == labels[i]:
                continue
            e = torch.exp(sim(anchors[i], positives[j]) - s_ii)
            if variant == "mc":
                exp_sum = exp_sum + e
            else:
                total = total + torch.log(1 + e)
        if variant == "mc":
            total = total + torch.log(1 + exp_sum)
    squared_norms = sum(torch.dot(anchors[i], anchors[i]) + torch.dot(positives[i], positives[i]) for i in range(n))
    return total / n + l2_reg * squared_norms / (2 * n)


def pair_batch(seed, n_pairs, dim, repeated_class):
    """Interleaved batch (rows 2i, 2i+1 share a label) split into anchors, positives, labels."""
    emb, labels = labelled_batch(seed, n_pairs, 2, dim, repeated_class=repeated_class)
    anchors = emb.detach()[0::2].clone().requires_grad_()
    positives = emb.detach()[1::2].clone().requires_grad_()
    return anchors, positives, labels[0::2]


@pytest.mark.parametrize("variant", ["mc", "ovo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_pairs,dim", [(3, 3), (5, 8), (9, 16)])
@pytest.mark.parametrize("repeated_class", [False, True])
def test_matches_loop_reference(variant, seed, n_pairs, dim, repeated_class):
    anchors, positives, labels = pair_batch(seed, n_pairs, dim, repeated_class)
    l2_reg = 0.05  # large enough that a wrong regulariser shows at 1e-6
    loss = NPairLoss(variant=variant, l2_reg=l2_reg)
    assert_matches_reference(
        lambda a, p: loss(a, p, labels),
        lambda a, p: npair_reference(a, p, labels, variant, l2_reg),
        anchors,
        positives,
    )


@pytest.mark.parametrize("variant", ["mc", "ovo"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 16.0])
@pytest.mark.parametrize("repeated_class", [False, True])
def test_scaled_cosine_matches_loop_reference(variant, seed, scale, repeated_class):
    anchors, positives, labels = pair_batch(seed, 7, 8, repeated_class)
    loss = NPairLoss(variant=variant, l2_reg=0.05, scale=scale)
    assert_matches_reference(
        lambda a, p: loss(a, p, labels),
        lambda a, p: npair_reference(a, p, labels, variant, 0.05, scale),
        anchors,
        positives,
    )


def test_scaled_cosine_ignores_embedding_norms_but_the_regulariser_does_not():
    anchors, positives, labels = pair_batch(4, 6, 5, False)
    stretch = torch.rand(6, 1, dtype=anchors.dtype) + 0.5  # positive per-row factors
    bare = NPairLoss(l2_reg=0.0, scale=8.0)
    torch.testing.assert_close(bare(anchors * stretch, positives / stretch, labels), bare(anchors, positives, labels))
    regularised = NPairLoss(l2_reg=0.1, scale=8.0)
    assert not torch.isclose(regularised(2 * anchors, positives, labels), regularised(anchors, positives, labels))


def test_scale_one_is_pytorch_metric_learnings_npairs_loss():
    # PML's NPairsLoss (its default cosine similarity) with distinct labels is N-pair-mc on
    # cosines: a cross-entropy over anchors x positives with the own positive as the target
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    anchors, positives, labels = pair_batch(5, 9, 16, False)
    ours = NPairLoss(variant="mc", l2_reg=0.0, scale=1.0)(anchors, positives, labels)
    emb = torch.stack([anchors, positives], dim=1).reshape(-1, anchors.shape[1])
    theirs = pml.NPairsLoss()(emb, labels.repeat_interleave(2))
    torch.testing.assert_close(ours, theirs)


def test_negative_scale_is_refused():
    with pytest.raises(ValueError, match="scale must be >= 0"):
        NPairLoss(scale=-1.0)


def test_repeated_class_is_masked_not_pushed():
    # with all labels distinct every other positive is a negative; relabelling pair 2 as
    # anchor 0's class must remove it from anchor 0's negatives (and 0 from 2's), lowering the loss
    anchors, positives, _ = pair_batch(0, 4, 5, False)
    loss = NPairLoss(variant="mc", l2_reg=0.0)
    distinct = loss(anchors, positives, torch.tensor([7, 3, 8, 5]))
    repeated = loss(anchors, positives, torch.tensor([7, 3, 7, 5]))
    assert repeated < distinct


def test_batch_loss_splits_interleaved_pairs():
    emb, labels = labelled_batch(3, 6, 2, 8, repeated_class=True)
    for variant in ("mc", "ovo"):
        expected = NPairLoss(variant=variant)(emb[0::2], emb[1::2], labels[0::2])
        torch.testing.assert_close(NPairBatchLoss(variant=variant)(emb, labels), expected)


def test_batch_loss_rejects_rows_not_in_pairs():
    emb, labels = labelled_batch(0, 3, 2, 4)
    with pytest.raises(ValueError, match="rows 2 and 3 must share a label"):
        NPairBatchLoss()(emb, torch.tensor([1, 1, 2, 5, 3, 3]))
    with pytest.raises(ValueError, match="odd number of rows 5"):
        NPairBatchLoss()(emb[:5], labels[:5])


def test_shape_errors():
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match="positives must have the anchors' shape"):
        NPairLoss()(a, torch.randn(4, 2), torch.arange(4))
    with pytest.raises(ValueError, match="labels must be"):
        NPairLoss()(a, a, torch.arange(3))
    with pytest.raises(ValueError, match="variant must be one of"):
        NPairLoss(variant="mcc")
