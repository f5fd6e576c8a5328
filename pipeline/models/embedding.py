"""Backbones, embedding heads, and the plain embedding network (backbone + head, optional L2 norm)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Per-channel statistics of ImageNet; a fixed normalisation that needs no data pass.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

BACKBONES = ("tiny", "small", "resnet18", "resnet34", "resnet50", "iresnet18", "iresnet50")
HEADS = ("linear", "linear_bn")
NORMS = ("batch", "group", "sync_batch")


def _tiny() -> tuple[nn.Module, int]:
    """A 4-layer CNN for tests and smoke runs (seconds per step on a CPU)."""
    layers, c_in = [], 3
    for c_out in (16, 32, 64, 64):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


def _small() -> tuple[nn.Module, int]:
    """A 4-conv CNN for CPU runs: ~13 M multiply-adds per 64x64 image (``tiny``: ~3.4 M, ``resnet18``: ~148 M).

    conv 5x5/2 32 + maxpool, conv 3x3 64 + maxpool, conv 3x3/2 128, conv 3x3 256, global
    average pool: the cost of the small CNN a plain PyTorch loop would use as a baseline
    (issue 17's peer), so a CPU quickstart compares like with like. The 256-channel layer runs
    at 4x4 for 64 px inputs; at 8x8 (no stride on the 128 layer) it alone would cost 19 M.
    ``tests/models/test_models.py`` counts the multiply-adds.
    """
    def block(c_in: int, c_out: int, k: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    layers = [*block(3, 32, 5, 2), nn.MaxPool2d(2), *block(32, 64, 3, 1), nn.MaxPool2d(2),
              *block(64, 128, 3, 2), *block(128, 256, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 256


def build_backbone(name: str, weights: str = "", norm: str = "batch") -> tuple[nn.Module, int]:
    """Return ``(trunk, feature_dim)`` for a backbone name; ``weights`` is an optional local file.

    ``norm``: ``batch`` keeps the published BatchNorm2d layers, ``group`` replaces them by
    GroupNorm (:func:`to_group_norm`) before the weights are loaded, ``sync_batch`` by
    BatchNorm over the global batch of all DDP ranks
    (:class:`pipeline.models.global_batch_norm.GlobalBatchNorm`).

    Names: ``tiny`` (tests), ``small`` (CPU runs, ~13 M multiply-adds at 64 px), torchvision ``resnet18``/``34``/``50`` (global-pooled features) and
    ``iresnet18``/``50`` (ArcFace's face trunk for 112x112, flattened 512x7x7 features).
    Raises ValueError for an unknown name or weights matching no parameter, and
    FileNotFoundError for a missing weights file. Nothing is downloaded: backbones start
    from random weights.
    """
    import torchvision

    if name == "tiny":
        trunk, dim = _tiny()
    elif name == "small":
        trunk, dim = _small()
    elif name in ("resnet18", "resnet34", "resnet50"):
        trunk = getattr(torchvision.models, name)(weights=None)
        dim = trunk.fc.in_features
        trunk.fc = nn.Identity()
    elif name in ("iresnet18", "iresnet50"):
        from pipeline.models.iresnet import iresnet

        trunk, dim = iresnet(name)
    else:
        raise ValueError(f"unknown model.backbone '{name}' (choose {', '.join(BACKBONES)})")
    if norm == "group":
        to_group_norm(trunk)
    elif norm == "sync_batch":
        from pipeline.models.global_batch_norm import to_global_batch_norm

        to_global_batch_norm(trunk)
    elif norm != "batch":
        raise ValueError(f"unknown model.norm '{norm}' (choose {', '.join(NORMS)})")
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise FileNotFoundError(f"model.weights file '{p}' does not exist")
        state = torch.load(p, map_location="cpu", weights_only=True)
        missing, _ = trunk.load_state_dict(state, strict=False)
        if len(missing) == len(trunk.state_dict()):
            raise ValueError(f"model.weights '{p}' matches no parameter of backbone '{name}'")
    return trunk, dim


def _groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels``."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def to_group_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` (in place) by a ``GroupNorm`` over the same channels.

    GroupNorm normalises each image by itself, so an image's embedding does not depend on
    which other images share its batch. That matters for hard class mining: train-mode
    BatchNorm normalises a batch of look-alike classes by their own statistics and removes
    the similarity the miner chose them for. Affine parameters keep BatchNorm's names
    (``weight``, ``bias``), so BatchNorm weights load into the converted layers (running
    statistics are ignored). Returns ``module``.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(_groups(child.num_features), child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
            setattr(module, name, gn)
        else:
            to_group_norm(child)
    return module


def build_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Return the embedding head: ``linear`` (Linear with bias) or ``linear_bn`` (Linear, then BatchNorm1d).

    ``linear_bn`` is the face-recognition habit (ArcFace's "features" layer): batch norm
    keeps every embedding dimension centred and at unit scale, which plain N-pair training
    with an L2 penalty on norms does not need but margin/softmax-style losses like. The
    Linear has no bias there (BN's shift replaces it). Raises ValueError for another kind.
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "linear_bn":
        return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim))
    raise ValueError(f"unknown model.head '{kind}' (choose {', '.join(HEADS)})")


class ImageModel(nn.Module):
    """Base of the networks: uint8 NHWC (or float NCHW in [0, 255]) images -> trunk features."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255, persistent=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 255]. Returns the trunk's (B, feat_dim)."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float()
        x = (images - self.mean) / self.std
        return self.trunk(x.contiguous(memory_format=torch.channels_last))


class EmbeddingNet(ImageModel):
    """uint8 NHWC images -> embeddings: normalise, trunk, embedding head, optional L2 norm."""

    def __init__(self, trunk: nn.Module, feat_dim: int, embedding_dim: int, normalize: bool = False,
                 head: str = "linear") -> None:
        super().__init__(trunk)
        self.head = build_head(head, feat_dim, embedding_dim)
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 255]. Returns (B, embedding_dim)."""
        z = self.head(self.features(images))
        return nn.functional.normalize(z, dim=1) if self.normalize else z
