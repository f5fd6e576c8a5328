"""build_loss: the trainer's way to get a loss by name."""

from __future__ import annotations

from pipeline.losses.base import BatchLoss
from pipeline.losses.contrastive import ContrastiveLoss
from pipeline.losses.coupled_clusters import CoupledClustersLoss
from pipeline.losses.npair import NPairBatchLoss
from pipeline.losses.triplet import TripletLoss
from pipeline.losses.tuplet import TupletLoss

LOSS_NAMES = ("npair_mc", "npair_ovo", "triplet", "tuplet", "contrastive", "coupled_clusters")
_MARGIN_LOSSES = {"triplet": TripletLoss, "contrastive": ContrastiveLoss, "coupled_clusters": CoupledClustersLoss}


def build_loss(
    name: str,
    *,
    l2_reg: float = 0.002,
    margin: float | None = None,
    cross_rank: bool = False,
    negatives: str = "all",
    seed: int = 0,
    scale: float = 0.0,
) -> BatchLoss:
    """Return the loss ``name`` as a module whose ``forward(embeddings (B, d), labels (B,))`` gives a scalar.

    The batch is laid out as consecutive blocks of images per class; the N-pair losses need
    pairs (rows 2i, 2i+1 of one class). ``l2_reg`` weighs the squared-norm penalty of
    npair_mc, npair_ovo and tuplet and is ignored by the others; ``margin`` is used by
    triplet (default 0.2), contrastive (1.0) and coupled_clusters (1.0), None = that default.
    ``negatives`` (triplet only): ``all`` valid triplets, or ``one`` random negative per
    (anchor, positive) pair (Sohn 2016's baseline), drawn by a generator seeded with ``seed``.
    ``scale`` (npair_mc, npair_ovo only): 0 = Sohn's unnormalised inner products, s > 0 =
    s x cosine similarity (see :mod:`pipeline.losses.npair`).
    Raises ValueError for an unknown name, a margin given to a loss without one,
    ``negatives`` other than ``all`` for a loss other than triplet, or a nonzero ``scale``
    for a loss other than the N-pair ones.
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    if negatives != "all" and name != "triplet":
        raise ValueError(f"negatives={negatives!r} applies to the triplet loss only, got loss {name!r}")
    if scale and not name.startswith("npair_"):
        raise ValueError(f"scale={scale} applies to npair_mc and npair_ovo only, got loss {name!r}")
    if name in _MARGIN_LOSSES:
        kwargs = {} if margin is None else {"margin": margin}
        if name == "triplet":
            kwargs.update(negatives=negatives, seed=seed)
        return _MARGIN_LOSSES[name](cross_rank=cross_rank, **kwargs)
    if margin is not None:
        raise ValueError(f"loss {name!r} has no margin, got margin={margin}; leave it empty (None)")
    if name == "tuplet":
        return TupletLoss(l2_reg=l2_reg, cross_rank=cross_rank)
    return NPairBatchLoss(variant=name.removeprefix("npair_"), l2_reg=l2_reg, cross_rank=cross_rank, scale=scale)
