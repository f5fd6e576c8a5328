"""Sohn's N-pair losses (NIPS 2016): multi-class (``mc``) and one-vs-one (``ovo``).

For anchors f_i, positives f_i+ and labels y_i (row i of both is class y_i):

* mc:  L = (1/N) sum_i log(1 + sum_{j: y_j != y_i} exp(f_i.f_j+ - f_i.f_i+))
* ovo: L = (1/N) sum_i sum_{j: y_j != y_i} log(1 + exp(f_i.f_j+ - f_i.f_i+))

plus ``l2_reg`` times the mean squared norm of the 2N embeddings (Sohn's regulariser for
unnormalised embeddings). With ``scale`` s > 0 the similarity f_i.f_j+ becomes s cos(f_i, f_j+)
(the embeddings are L2-normalised inside the loss; the regulariser still acts on the raw
embeddings): s = 1 is pytorch-metric-learning's ``NPairsLoss`` default (cosine), larger s
sharpens the softmax as in NormFace. A positive j != i with the same label as i is never a negative:
it is masked out, so a class drawn twice (in the batch or on two ranks) is not pushed away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import BatchLoss, check_batch, check_has_negatives
from pipeline.losses.distributed import gather_batch

VARIANTS = ("mc", "ovo")


class NPairLoss(torch.nn.Module):
    """N-pair loss on (anchors, positives, labels); see the module docstring for the formulas.

    With ``cross_rank`` the positives (the negatives' pool) are gathered from every rank;
    each rank scores its own anchors (see ``distributed.py`` for the gradient scaling).
    """

    def __init__(self, variant: str = "mc", l2_reg: float = 0.002, cross_rank: bool = False, scale: float = 0.0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"NPairLoss: variant must be one of {VARIANTS}, got {variant!r}")
        if l2_reg < 0:
            raise ValueError(f"NPairLoss: l2_reg must be >= 0, got {l2_reg}")
        if not scale >= 0:
            raise ValueError(f"NPairLoss: scale must be >= 0 (0 = unnormalised inner products), got {scale}")
        self.variant = variant
        self.l2_reg = l2_reg
        self.cross_rank = cross_rank
        self.scale = float(scale)

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the loss (0-dim) for anchors (N, d), positives (N, d) and labels (N,).

        Raises ValueError on mismatched shapes or when all labels are equal.
        """
        check_batch(anchors, labels, "NPairLoss anchors")
        if positives.shape != anchors.shape:
            raise ValueError(
                f"NPairLoss: positives must have the anchors' shape {tuple(anchors.shape)}, "
                f"got {tuple(positives.shape)}"
            )
        if self.scale:
            pool = gather_batch(F.normalize(positives, dim=1), labels, self.cross_rank)
            logits = self.scale * (F.normalize(anchors, dim=1) @ pool.embeddings.T)  # (N, W*N): s cos(f_i, f_j+)
        else:
            pool = gather_batch(positives, labels, self.cross_rank)
            logits = anchors @ pool.embeddings.T  # (N, W*N): f_i . f_j+
        check_has_negatives(pool.labels, "NPairLoss")
        n_global = pool.labels.shape[0]

        target = torch.arange(pool.own.start, pool.own.stop, device=anchors.device)
        rows = torch.arange(len(target), device=anchors.device)
        if self.variant == "mc":
            # log(1 + sum_neg exp(s_ij - s_ii)) = logsumexp({s_ii} U {s_ij: neg}) - s_ii: a cross-entropy
            # whose same-class columns (other than the own positive) are -inf: exp -> 0, no gradient.
            # When no label repeats there is no such column and the (N, W*N) mask is skipped.
            if torch.unique(pool.labels).numel() < n_global:
                same_class = labels[:, None] == pool.labels[None, :]
                same_class[rows, target] = False
                logits = logits.masked_fill(same_class, float("-inf"))
            own_sum = F.cross_entropy(logits, target, reduction="sum")
        else:
            terms = F.softplus(logits - logits[rows, target][:, None])
            negatives = labels[:, None] != pool.labels[None, :]
            own_sum = torch.where(negatives, terms, 0.0).sum()
        loss = pool.share_of_mean(own_sum, n_global)
        if self.l2_reg:
            squared_norms = anchors.pow(2).sum() + positives.pow(2).sum()
            loss = loss + self.l2_reg * pool.share_of_mean(squared_norms, 2 * n_global)
        return loss


class NPairBatchLoss(BatchLoss):
    """N-pair loss on a trainer batch laid out as pairs: rows 2i and 2i+1 are class labels[2i].

    Splits anchors = rows 0::2, positives = rows 1::2 and calls :class:`NPairLoss`.
    """

    def __init__(self, variant: str = "mc", l2_reg: float = 0.002, cross_rank: bool = False, scale: float = 0.0):
        super().__init__(cross_rank=cross_rank)
        self.npair = NPairLoss(variant=variant, l2_reg=l2_reg, cross_rank=cross_rank, scale=scale)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the N-pair loss of the interleaved batch.

        Raises ValueError when the batch has an odd number of rows, when rows 2i and 2i+1
        have different labels, or on the errors of :class:`NPairLoss`.
        """
        check_batch(embeddings, labels, "NPairBatchLoss")
        if embeddings.shape[0] % 2:
            raise ValueError(
                f"NPairBatchLoss: the batch must hold pairs (rows 2i, 2i+1 of one class), "
                f"got an odd number of rows {embeddings.shape[0]}; set images_per_class to 2"
            )
        bad = (labels[0::2] != labels[1::2]).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"NPairBatchLoss: rows {2 * i} and {2 * i + 1} must share a label (anchor, positive), "
                f"got {labels[2 * i].item()} and {labels[2 * i + 1].item()}; "
                f"the batch must be laid out as consecutive pairs per class"
            )
        return self.npair(embeddings[0::2], embeddings[1::2], labels[0::2])
