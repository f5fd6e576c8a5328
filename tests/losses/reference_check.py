"""Random labelled batches and the value-and-gradient comparison against slow references."""

from __future__ import annotations

import torch

RTOL = 1e-6
ATOL = 1e-10  # gradients of inactive hinge terms are exactly 0 on one side, ~1e-17 on the other


def labelled_batch(
    seed: int,
    n_classes: int,
    per_class: int,
    dim: int,
    *,
    repeated_class: bool = False,
    singletons: int = 0,
    shuffle: bool = False,
    scale: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (embeddings (B, dim) float64 leaf with grad, labels (B,) int64).

    Blocks of ``per_class`` rows per class; ``repeated_class`` gives the last block the
    first block's label (a class drawn twice); ``singletons`` adds rows of unique labels.
    """
    gen = torch.Generator().manual_seed(seed)
    block_labels = torch.randperm(100, generator=gen)[:n_classes]
    if repeated_class:
        block_labels[-1] = block_labels[0]
    labels = block_labels.repeat_interleave(per_class)
    labels = torch.cat([labels, 100 + torch.arange(singletons)])
    if shuffle:
        labels = labels[torch.randperm(len(labels), generator=gen)]
    emb = scale * torch.randn(len(labels), dim, generator=gen, dtype=torch.float64)
    return emb.requires_grad_(), labels


def value_and_grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Return fn(*inputs) detached and its gradients w.r.t. the inputs."""
    value = fn(*inputs)
    grads = torch.autograd.grad(value, inputs)
    return value.detach(), grads


def assert_matches_reference(fast, slow, *inputs: torch.Tensor) -> torch.Tensor:
    """Assert fast and slow agree in value and gradient (rtol 1e-6); return the value."""
    value, grads = value_and_grads(fast, *inputs)
    ref_value, ref_grads = value_and_grads(slow, *inputs)
    torch.testing.assert_close(value, ref_value, rtol=RTOL, atol=ATOL)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=ATOL)
    return value
