"""Backbone + linear embedding head (optionally L2-normalised)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Per-channel statistics of ImageNet; a fixed normalisation that needs no data pass.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _tiny() -> tuple[nn.Module, int]:
    """A 4-layer CNN for tests and smoke runs (seconds per step on a CPU)."""
    layers, c_in = [], 3
    for c_out in (16, 32, 64, 64):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


def build_backbone(name: str, weights: str = "") -> tuple[nn.Module, int]:
    """Return ``(trunk, feature_dim)`` for a backbone name; ``weights`` is an optional local file.

    Raises ValueError for an unknown name and FileNotFoundError for a missing weights file.
    Nothing is downloaded: torchvision backbones start from random weights.
    """
    import torchvision

    if name == "tiny":
        trunk, dim = _tiny()
    elif name in ("resnet18", "resnet34", "resnet50"):
        trunk = getattr(torchvision.models, name)(weights=None)
        dim = trunk.fc.in_features
        trunk.fc = nn.Identity()
    else:
        raise ValueError(f"unknown model.backbone '{name}' (choose tiny, resnet18, resnet34, resnet50)")
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise FileNotFoundError(f"model.weights file '{p}' does not exist")
        state = torch.load(p, map_location="cpu", weights_only=True)
        missing, _ = trunk.load_state_dict(state, strict=False)
        if len(missing) == len(trunk.state_dict()):
            raise ValueError(f"model.weights '{p}' matches no parameter of backbone '{name}'")
    return trunk, dim


class EmbeddingNet(nn.Module):
    """uint8 NHWC images -> embeddings: normalise, trunk, linear head, optional L2 norm."""

    def __init__(self, trunk: nn.Module, feat_dim: int, embedding_dim: int, normalize: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(feat_dim, embedding_dim)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 255]. Returns (B, embedding_dim)."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float()
        x = (images - self.mean) / self.std
        z = self.head(self.trunk(x.contiguous(memory_format=torch.channels_last)))
        return nn.functional.normalize(z, dim=1) if self.normalize else z


def build_model(cfg) -> EmbeddingNet:
    """Build the embedding network from a ``ModelConfig``."""
    trunk, dim = build_backbone(cfg.backbone, cfg.weights)
    return EmbeddingNet(trunk, dim, cfg.embedding_dim, cfg.normalize)
