"""Wide ResNets WRN-depth-k (Zagoruyko & Komodakis 2016) with pre-activation blocks."""
from __future__ import annotations

import torch
from torch import nn

from kdx.models.contract import ClassifierNet
from kdx.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, with optional dropout between the convolutions."""

    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.drop(self.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(ClassifierNet):
    """WRN-depth-widen: 3 stages of (depth-4)/6 blocks, widths 16k, 32k, 64k."""

    feature_stages = ("block1", "block2", "block3")  # module paths of the stage outputs (feature taps)

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, drop_rate))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return torch.flatten(self.pool(self.relu(self.bn(x))), 1)


def _factory(depth: int, widen: int):
    def build(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, **_: object) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_chans, drop_rate)

    build.__doc__ = f"WRN-{depth}-{widen}."
    return build


WIDE_RESNETS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2),
                "wrn_28_10": (28, 10)}
"""name -> (depth, widening factor) of the registered Wide ResNets."""

for _name, (_depth, _widen) in WIDE_RESNETS.items():
    register_model(_name)(_factory(_depth, _widen))
