"""Metric learning losses, each selectable by name through :func:`build_loss`.

Every loss masks by label (a row with the anchor's label is never a negative) and can
gather the batch across DDP ranks (``cross_rank=True``); see ``distributed.py``.
"""

from pipeline.losses.base import BatchLoss
from pipeline.losses.contrastive import ContrastiveLoss
from pipeline.losses.coupled_clusters import CoupledClustersLoss
from pipeline.losses.factory import LOSS_NAMES, build_loss
from pipeline.losses.npair import NPairBatchLoss, NPairLoss
from pipeline.losses.triplet import TripletLoss
from pipeline.losses.tuplet import TupletLoss

__all__ = [
    "LOSS_NAMES",
    "BatchLoss",
    "ContrastiveLoss",
    "CoupledClustersLoss",
    "NPairBatchLoss",
    "NPairLoss",
    "TripletLoss",
    "TupletLoss",
    "build_loss",
]
