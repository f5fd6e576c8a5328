"""The Mixed Difference Network (Liu et al., CVPR 2016, "Deep Relative Distance Learning").

The paper's network for vehicle re-identification has two branches on a shared
convolutional trunk (VGG_CNN_M_1024 there):
  * a **model branch** whose fully connected layers feed a softmax classifier over vehicle
    models, so its features learn what separates models (sedan A vs sedan B);
  * an **instance branch** of the same shape, left to learn what separates two vehicles
    of the same model;
and fuses the two branches' features (concatenation, then a fully connected layer) into the
embedding trained with the coupled clusters loss (CCL). The total loss is
CCL(embedding) + w * CE(model logits), w = ``loss.model_branch_weight``.

What is implemented here (and where it departs from the paper as far as we know it):
  * the trunk is any backbone of ``build_backbone`` (ResNet-50 by default, ImageNet-style
    global pooling); each branch is one ``Linear -> BatchNorm1d -> ReLU`` layer of
    ``branch_dim`` (1024, VGG-M's fc7 width) on the pooled features, where the paper's
    branches are VGG-M's fc6/fc7 on the conv5 map; BN replaces dropout;
  * the model classifier is a Linear over ``num_vehicle_models`` classes; samples whose
    model is unknown (label -1: VehicleID gives models for only part of the vehicles)
    are left out of its cross-entropy (:func:`model_branch_loss`);
  * fusion is ``concat(model features, instance features) -> model.head`` (Linear, or
    Linear + BN), then optional L2 normalisation;
  * the paper also builds CCL's negative sets from vehicles of the same and of other
    models ("mixed" differences); that is batch composition, not the network, and is
    not done here.
``forward(images)`` returns only the embedding, so evaluation and the miner treat this
network like :class:`~pipeline.models.embedding.EmbeddingNet`; training calls
``model(images, return_logits=True)`` (through the DDP wrapper, which only syncs gradients
for calls of ``forward``; every parameter is used on that path).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.embedding import ImageModel, build_head

UNKNOWN_MODEL = -1
"""Model label of a sample whose vehicle model is not known (ignored by the classifier's loss)."""


def _branch(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


class MixedDifferenceNet(ImageModel):
    """Shared trunk -> (model branch -> classifier, instance branch) -> fused embedding."""

    def __init__(self, trunk: nn.Module, feat_dim: int, embedding_dim: int, num_models: int,
                 branch_dim: int = 1024, normalize: bool = False, head: str = "linear") -> None:
        super().__init__(trunk)
        if num_models < 1:
            raise ValueError(f"model.num_vehicle_models must be >= 1, got {num_models}")
        self.model_branch = _branch(feat_dim, branch_dim)
        self.instance_branch = _branch(feat_dim, branch_dim)
        self.classifier = nn.Linear(branch_dim, num_models)
        self.head = build_head(head, 2 * branch_dim, embedding_dim)  # the fusion layer
        self.normalize = normalize
        self.num_models = num_models

    def forward(self, images: torch.Tensor, return_logits: bool = False):
        """``images``: uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 255].

        Returns the (B, embedding_dim) embedding, or ``(embedding, model_logits)`` with
        logits of shape (B, num_models) when ``return_logits``.
        """
        f = self.features(images)
        m = self.model_branch(f)
        z = self.head(torch.cat([m, self.instance_branch(f)], dim=1))
        if self.normalize:
            z = nn.functional.normalize(z, dim=1)
        return (z, self.classifier(m)) if return_logits else z

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(embedding, model_logits)``; same as ``self(images, return_logits=True)`` (call that under DDP)."""
        return self(images, return_logits=True)


def model_branch_loss(logits: torch.Tensor, model_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model classifier over the samples whose model is known.

    ``logits``: (B, num_models); ``model_labels``: (B,) int, -1 = unknown (left out).
    Returns a scalar; 0 (still attached to the graph, so DDP sees every parameter used)
    when no sample in the batch has a known model. Raises ValueError for a label below -1
    or >= num_models (names ``model.num_vehicle_models``).
    """
    if logits.ndim != 2 or model_labels.shape != logits.shape[:1]:
        raise ValueError(f"logits (B, C) and labels (B,) expected, "
                         f"got {tuple(logits.shape)} and {tuple(model_labels.shape)}")
    if len(model_labels) == 0:
        return logits.sum() * 0.0
    lo, hi = int(model_labels.min()), int(model_labels.max())
    if lo < UNKNOWN_MODEL or hi >= logits.shape[1]:
        raise ValueError(f"vehicle model labels must be in [-1, {logits.shape[1] - 1}], got [{lo}, {hi}]: "
                         "raise model.num_vehicle_models to the data set's number of models")
    known = model_labels != UNKNOWN_MODEL
    if not bool(known.any()):
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits[known], model_labels[known])
