"""IResNet: the "improved" ResNet of ArcFace (Deng et al. 2019) for 112x112 aligned faces.

Layer names follow insightface's ``arcface_torch/backbones/iresnet.py`` (conv1, bn1, prelu,
layer1..4, bn2), so the trunk of an insightface checkpoint loads with ``model.weights``
(its ``fc``/``features`` head does not: our head is built apart, see ``embedding.py``).

Differences from a torchvision ResNet, and why they suit faces:
  * stride-1 3x3 stem and no max-pool: a 112x112 face keeps a 7x7 map after 4 stride-2
    stages, where a ResNet stem would leave 4x4;
  * pre-activation-style blocks ``BN -> conv -> BN -> PReLU -> conv(stride) -> BN``;
  * the output is the flattened 512x7x7 map (after BN), not a global average: the head's
    fully connected layer sees where on the aligned face each feature is ("output layer E"
    of the ArcFace paper). An adaptive pool to 7x7 lets other input sizes run too.
"""

from __future__ import annotations

from torch import nn

LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
"""Blocks per stage of each depth (insightface's table)."""

OUT_SIDE = 7
"""Side of the final feature map for a 112x112 input; other sizes are pooled to it."""


class IBasicBlock(nn.Module):
    """``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` plus the (projected) identity."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """IResNet trunk: (B, 3, H, W) normalised images -> (B, 512 * 7 * 7) features."""

    def __init__(self, layers: tuple[int, int, int, int], dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes, stages = 64, []
        for planes, blocks in zip((64, 128, 256, 512), layers):
            stage = [IBasicBlock(inplanes, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.pool = nn.AdaptiveAvgPool2d(OUT_SIDE)  # identity at 112x112
        self.dropout = nn.Dropout(dropout)
        self.out_dim = 512 * OUT_SIDE * OUT_SIDE
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(self.pool(self.bn2(x))).flatten(1)


def iresnet(name: str) -> tuple[IResNet, int]:
    """Return ``(trunk, feature_dim)`` for ``iresnet18``/``34``/``50``/``100``; KeyError for another name."""
    trunk = IResNet(LAYERS[name])
    return trunk, trunk.out_dim
