"""How hard a batch is: hardest-negative similarity and margin violations, from its embeddings.

Used by rank 0 to log, per step, how hard the batch it trained on was (and, on sampled
steps, a random batch drawn side by side from the same pool), so the effect of mining is
visible in MLflow. Similarities are cosines (embeddings L2-normalised here): the N-pair
loss trains unnormalised embeddings whose norms drift with the L2 penalty, and cosine is
what the miner ranks classes by, so it compares across steps and with the miner.
"""

from __future__ import annotations

import torch

VIOLATION_MARGIN = 0.1
"""A triplet (a, p, n) violates the margin when cos(a, n) + 0.1 > cos(a, p)."""


@torch.no_grad()
def batch_hardness(emb: torch.Tensor, labels: torch.Tensor, margin: float = VIOLATION_MARGIN) -> dict[str, float]:
    """Hardness of one batch of embeddings.

    Args:
        emb: (B, d) embeddings (any scale; they are normalised here).
        labels: (B,) class ids.
        margin: the cosine margin of a violation.

    Returns:
        ``hardest_neg_sim_mean`` / ``hardest_neg_sim_max``: over anchors that have a
        negative in the batch, the cosine to the most similar image of another class;
        ``violation_frac``: the fraction of triplets (anchor a, positive p != a with a's
        label, negative n of another label) with cos(a, n) + margin > cos(a, p). NaN when
        the batch has no negative (or no triplet).

    Raises:
        ValueError: emb is not (B, d) or labels not (B,).
    """
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(f"batch_hardness: expected emb (B, d) and labels (B,), got {tuple(emb.shape)} and "
                         f"{tuple(labels.shape)}")
    z = torch.nn.functional.normalize(emb.float(), dim=1)
    sim = z @ z.T
    same = labels[:, None] == labels[None, :]
    neg = ~same
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    nan = float("nan")
    out = {"hardest_neg_sim_mean": nan, "hardest_neg_sim_max": nan, "violation_frac": nan}
    has_neg = neg.any(dim=1)
    if not has_neg.any():
        return out
    neg_sim = sim.masked_fill(~neg, float("-inf"))
    hardest = neg_sim.max(dim=1).values[has_neg]
    out["hardest_neg_sim_mean"] = hardest.mean().item()
    out["hardest_neg_sim_max"] = hardest.max().item()
    # For each (a, p): negatives n with sim[a, n] > sim[a, p] - margin, by a search in a's
    # sorted negative similarities (-inf for non-negatives never counts): O(B^2 log B), no B^3 tensor.
    sorted_neg = neg_sim.sort(dim=1).values
    not_above = torch.searchsorted(sorted_neg, (sim - margin).contiguous(), right=True)
    violating = (len(labels) - not_above)[pos].sum().item()
    triplets = (pos.sum(dim=1) * neg.sum(dim=1)).sum().item()
    if triplets:
        out["violation_frac"] = violating / triplets
    return out
