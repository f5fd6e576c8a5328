"""BatchNorm whose training statistics span the global batch (every DDP rank's rows), on any backend.

``model.norm: sync_batch``. Plain BatchNorm in a DDP job normalises each rank's rows by
that rank's own mean and variance: with N-pair batches of N / W classes per rank, a rank's
statistics come from a handful of classes (8 at N = 16 on 2 ranks), and a mined batch of
look-alike classes is normalised by its own look-alikes. Here the per-channel mean and
variance are taken over the concatenated batch of all ranks instead, with autograd through
the reductions, so values, gradients and running statistics are those of one process
running BatchNorm on the whole global batch (``tests/models/test_global_batch_norm.py``
checks this against ``nn.BatchNorm2d`` on 2 gloo ranks).

``torch.nn.SyncBatchNorm`` does the same on CUDA only (it refuses CPU tensors, so a gloo
job on CPUs could not use it); this module runs wherever ``torch.distributed`` runs. Cost:
two all-reduces per layer and step, of C + 1 and C floats (C = channels; the ``small``
backbone's four layers: 480 channels together), and no host synchronisation. In eval mode, and without a
process group of more than one rank, it is exactly ``BatchNorm``. Its state dict has
BatchNorm's keys, so checkpoints move freely between ``model.norm: batch`` and
``sync_batch``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, ...) inputs with training statistics over every rank's rows.

    Every rank must run its training-mode forward (and backward) in step with the others,
    as DDP does: the statistics are collectives.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or _world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        acc = torch.promote_types(input.dtype, torch.float32)
        # One all-reduce for the channel sums and, last, the rows x positions of every rank (ranks
        # may hold different batch sizes); the count stays a tensor: no host sync in the step.
        local = torch.cat([input.sum(dims, dtype=acc), input.new_full((1,), input.numel() / input.shape[1], dtype=acc)])
        total = all_reduce(local)
        n = total[-1].detach()
        mean = (total[:-1] / n).to(input.dtype)
        centred = input - mean.view(shape)
        var = (all_reduce(centred.pow(2).sum(dims, dtype=acc)) / n).to(input.dtype)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """BatchNorm's update: an EMA with ``momentum`` (a cumulative mean when None) of the mean
        and of the unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / (n - 1.0).clamp(min=1.0)).to(var.dtype)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def to_global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer (1d/2d/3d) in ``module``, in place, by a :class:`GlobalBatchNorm`
    with the same settings, weights and running statistics. Returns ``module`` (a BatchNorm
    ``module`` itself is returned converted)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, eps=module.eps, momentum=module.momentum,
                              affine=module.affine, track_running_stats=module.track_running_stats)
        state = module.state_dict()
        like = next((v for v in state.values() if v.is_floating_point()), None)
        if like is not None:
            out = out.to(device=like.device, dtype=like.dtype)
        out.load_state_dict(state)
        return out
    for name, child in module.named_children():
        converted = to_global_batch_norm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
