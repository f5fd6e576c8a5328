import pytest

from pipeline.losses import (
    LOSS_NAMES,
    BatchLoss,
    ContrastiveLoss,
    CoupledClustersLoss,
    NPairBatchLoss,
    TripletLoss,
    TupletLoss,
    build_loss,
)


def test_every_name_builds_a_batch_loss():
    expected = {
        "npair_mc": NPairBatchLoss,
        "npair_ovo": NPairBatchLoss,
        "triplet": TripletLoss,
        "tuplet": TupletLoss,
        "contrastive": ContrastiveLoss,
        "coupled_clusters": CoupledClustersLoss,
    }
    assert set(LOSS_NAMES) == set(expected)
    for name in LOSS_NAMES:
        loss = build_loss(name, cross_rank=True)
        assert isinstance(loss, expected[name]) and isinstance(loss, BatchLoss)
        assert loss.cross_rank
    assert build_loss("npair_ovo").npair.variant == "ovo"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'npair'; valid names: npair_mc, npair_ovo, triplet"):
        build_loss("npair")


def test_margin_none_means_each_loss_default():
    assert build_loss("triplet").margin == 0.2
    assert build_loss("contrastive").margin == 1.0
    assert build_loss("coupled_clusters").margin == 1.0
    assert build_loss("triplet", margin=0.5).margin == 0.5


def test_l2_reg_reaches_npair_and_tuplet():
    assert build_loss("npair_mc", l2_reg=0.1).npair.l2_reg == 0.1
    assert build_loss("tuplet", l2_reg=0.1).l2_reg == 0.1


@pytest.mark.parametrize("name", ["npair_mc", "npair_ovo", "tuplet"])
def test_margin_on_a_loss_without_one_is_an_error(name):
    with pytest.raises(ValueError, match="has no margin"):
        build_loss(name, margin=0.2)


def test_negative_margin_is_an_error():
    with pytest.raises(ValueError, match="margin must be >= 0"):
        build_loss("contrastive", margin=-1.0)


def test_negatives_reach_the_triplet_loss_only():
    assert build_loss("triplet").negatives == "all"
    assert build_loss("triplet", negatives="one").negatives == "one"
    with pytest.raises(ValueError, match="triplet loss only"):
        build_loss("npair_mc", negatives="one")


def test_scale_reaches_the_npair_losses_only():
    assert build_loss("npair_mc").npair.scale == 0.0
    assert build_loss("npair_ovo", scale=16.0).npair.scale == 16.0
    with pytest.raises(ValueError, match="npair_mc and npair_ovo only"):
        build_loss("triplet", scale=16.0)
