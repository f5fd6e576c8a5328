import pytest
import torch

from pipeline.losses import CoupledClustersLoss

from .reference_check import assert_matches_reference, labelled_batch


def coupled_clusters_reference(emb, labels, margin):
    """Liu et al.: per identity with >= 2 images, centre, nearest other-identity image, hinge sum; mean."""
    b = len(labels)
    identities = []
    for y in labels.tolist():
        if y not in identities:
            identities.append(y)
    total, count = torch.zeros((), dtype=emb.dtype), 0
    for y in identities:
        members = [i for i in range(b) if labels[i] == y]
        if len(members) < 2:
            continue
        centre = sum(emb[i] for i in members) / len(members)
        nearest, nearest_d2 = None, None
        for j in range(b):
            if labels[j] == y:
                continue
            d2 = torch.sum((emb[j] - centre) ** 2)
            if nearest_d2 is None or d2.item() < nearest_d2.item():
                nearest, nearest_d2 = j, d2
        for p in members:
            total = total + 0.5 * torch.clamp(torch.sum((emb[p] - centre) ** 2) + margin - nearest_d2, min=0.0)
        count += 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "n_classes,per_class,dim,repeated_class,singletons",
    [(2, 2, 3, False, 0), (3, 3, 4, True, 1), (5, 4, 8, True, 2)],
)
@pytest.mark.parametrize("margin", [0.3, 3.0])
def test_matches_loop_reference(seed, n_classes, per_class, dim, repeated_class, singletons, margin):
    emb, labels = labelled_batch(
        seed, n_classes, per_class, dim, repeated_class=repeated_class, singletons=singletons, shuffle=True
    )
    value = assert_matches_reference(
        lambda e: CoupledClustersLoss(margin=margin)(e, labels),
        lambda e: coupled_clusters_reference(e, labels, margin),
        emb,
    )
    if margin == 3.0:
        assert value > 0  # some hinge is active, so the gradient check is not vacuous


def test_no_identity_with_two_images_is_an_error():
    with pytest.raises(ValueError, match="no identity has at least 2 images"):
        CoupledClustersLoss()(torch.randn(4, 3), torch.arange(4))
