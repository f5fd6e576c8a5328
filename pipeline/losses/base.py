"""BatchLoss: the interface the trainer calls, and the input checks every loss shares."""

from __future__ import annotations

import torch

from pipeline.losses.distributed import GlobalBatch, gather_batch


class BatchLoss(torch.nn.Module):
    """A loss over one training batch: ``forward(embeddings (B, d), labels (B,)) -> scalar``.

    Subclasses implement :meth:`compute` on the (possibly cross-rank) :class:`GlobalBatch`;
    this class checks the inputs, gathers across ranks when ``cross_rank`` is set, and
    refuses batches without negatives.
    """

    def __init__(self, cross_rank: bool = False):
        super().__init__()
        self.cross_rank = cross_rank

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the loss of this rank's rows (a 0-dim tensor).

        Raises ValueError on malformed inputs or a (global) batch with a single class.
        """
        check_batch(embeddings, labels, type(self).__name__)
        batch = gather_batch(embeddings, labels, self.cross_rank)
        check_has_negatives(batch.labels, type(self).__name__)
        return self.compute(batch)

    def compute(self, batch: GlobalBatch) -> torch.Tensor:
        """Return this rank's share of the loss on ``batch`` (see ``distributed.py``)."""
        raise NotImplementedError


def check_batch(embeddings: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    """Raise ValueError unless ``embeddings`` is floating (B, d) and ``labels`` is (B,)."""
    if embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError(
            f"{where}: embeddings must be a floating (B, d) tensor, got dtype {embeddings.dtype} "
            f"shape {tuple(embeddings.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{where}: labels must be (B,) = ({embeddings.shape[0]},) to match the embeddings, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")


def check_has_negatives(labels: torch.Tensor, where: str) -> None:
    """Raise ValueError when ``labels`` hold fewer than 2 distinct classes (no negatives)."""
    if labels.numel() == 0 or bool((labels == labels[0]).all()):
        raise ValueError(
            f"{where}: the batch has only one distinct class (label {labels[:1].tolist()}); "
            f"the loss needs at least 2 distinct classes to have negatives"
        )
