"""One training step, as ``jobs.train`` and the benchmarks run it: objective, precision, clipping, schedule.

* :func:`param_groups` / :func:`make_optimizer`: weight decay on weights only. Biases and
  the weights of normalisation layers (every parameter with fewer than 2 dimensions) are not
  decayed: decaying a BatchNorm/GroupNorm scale pulls it towards 0 and fights the
  normalisation instead of regularising the network (the habit of timm and arcface_torch).
* :func:`lr_factor` / :func:`make_scheduler`: linear warm-up over ``train.warmup_steps``,
  then ``constant``, ``cosine`` to 0 at ``train.steps``, or ``step`` (``lr_gamma`` at each
  of ``lr_milestones``). The factor of step ``s`` is the one the optimizer uses for the
  update that makes step ``s + 1`` (the first update uses ``lr_factor(0)``).
* :class:`MetricObjective` (a metric loss on the embedding) and
  :class:`MixedDiffObjective` (Liu et al. 2016: the metric loss on the fused embedding plus
  ``loss.model_branch_weight`` x the vehicle-model branch's cross-entropy).
* :class:`TrainStep`: forward under autocast (``train.precision``), the objective in fp32,
  backward (with a gradient scaler for fp16), gradient clipping, optimizer and scheduler
  step. Losses are summed on the device and read once per log interval (:meth:`TrainStep.read`):
  no host sync per step.
"""

from __future__ import annotations

import math

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: every >= 2-d parameter with ``weight_decay``, every 1-d one (biases,
    normalisation weights) without. Frozen parameters are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 or Adam (``train.optimizer``) over :func:`param_groups`."""
    groups = param_groups(model, cfg.train.weight_decay)
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.train.lr)
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=0.9)


def lr_factor(train_cfg, step: int) -> float:
    """The multiple of ``train.lr`` that the update of step ``step`` (0-based) uses."""
    w, total = train_cfg.warmup_steps, train_cfg.steps
    if step < w:
        return (step + 1) / w
    if train_cfg.lr_schedule == "cosine":
        t = (step - w) / max(1, total - w)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if train_cfg.lr_schedule == "step":
        return train_cfg.lr_gamma ** sum(1 for m in train_cfg.lr_milestones if step >= m)
    return 1.0


def make_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`lr_factor`; its ``state_dict`` goes into every checkpoint."""
    train_cfg = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(train_cfg, s))


class MetricObjective:
    """The metric loss on the model's embedding: ``(loss, embeddings, {})``."""

    def __init__(self, loss_fn) -> None:
        self.loss_fn = loss_fn

    def __call__(self, model, images, labels, autocast):
        with autocast():
            emb = model(images)
        return self.loss_fn(emb.float(), labels), emb, {}


class MixedDiffObjective:
    """Mixed Difference Network: metric loss on the fused embedding + ``weight`` x the model branch's
    cross-entropy against each class's vehicle model (``model_of_class``: class id -> model id, -1
    unknown). Extra terms: ``train/metric_loss`` and ``train/model_ce`` (device tensors)."""

    def __init__(self, loss_fn, model_of_class: torch.Tensor, weight: float) -> None:
        self.loss_fn, self.model_of_class, self.weight = loss_fn, model_of_class, weight

    def __call__(self, model, images, labels, autocast):
        from pipeline.models.mixed_diff import model_branch_loss

        with autocast():  # through the DDP wrapper, so the branch's gradients sync too
            emb, logits = model(images, return_logits=True)
        metric = self.loss_fn(emb.float(), labels)
        ce = model_branch_loss(logits.float(), self.model_of_class[labels])
        return metric + self.weight * ce, emb, {"train/metric_loss": metric.detach(), "train/model_ce": ce.detach()}


class TrainStep:
    """Forward, objective, backward, clip, optimizer and scheduler step (see the module docstring).

    ``precision``: ``fp32``, ``bf16`` or ``fp16`` (a ``torch.amp.GradScaler``). ``grad_clip`` > 0
    clips the global gradient norm. Call it with a batch; it returns the step's embeddings
    (detached, for metrics). :meth:`read` returns the mean loss (and extra terms) since the
    last read, and the last gradient norm, as floats: the one host sync of a log interval.
    """

    def __init__(self, model, objective, optimizer, scheduler=None, precision: str = "fp32",
                 grad_clip: float = 0.0, device: torch.device | str = "cpu") -> None:
        self.model, self.objective, self.optimizer, self.scheduler = model, objective, optimizer, scheduler
        self.device = torch.device(device)
        self.dtype = PRECISIONS[precision]
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self._sums: dict[str, torch.Tensor] = {}
        self._n = 0
        self._grad_norm = None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, emb, extras = self.objective(self.model, images, labels, self.autocast)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip > 0:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for k, v in {"train/loss": loss.detach(), **extras}.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._n += 1
        return emb.detach()

    def lr(self) -> float:
        """The learning rate the next update will use (of the first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def read(self) -> dict[str, float]:
        """Mean of each loss term over the steps since the last read (and ``train/grad_norm``, the
        last step's norm before clipping, when clipping); resets the sums. {} when no step ran."""
        if not self._n:
            return {}
        out = {k: float(v) / self._n for k, v in self._sums.items()}
        if self._grad_norm is not None:
            out["train/grad_norm"] = float(self._grad_norm)
        self._sums, self._n = {}, 0
        return out
