"""IResNet face-embedding networks (Deng et al., ArcFace; insightface `arcface_torch` layout).

Blocks are BN-conv3x3-BN-PReLU-conv3x3(stride)-BN plus a shortcut; four stages (64, 128, 256, 512
channels) each halve the resolution; the head is BN-dropout-flatten-FC-BN1d and returns the
(unnormalised) embedding. 112x112 inputs give a 7x7 map; other sizes work, the FC input size is
computed from `input_size`. The classifier (margin head) lives outside the network.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdx.configs import as_hw
from kdx.models.registry import register_model

IRESNET_LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
                  "iresnet100": (3, 13, 30, 3)}


def _halve(n: int) -> int:
    return (n - 1) // 2 + 1  # output of a 3x3, stride-2, padding-1 convolution


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of IResNet."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_ch, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch plus shortcut."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """IResNet backbone + embedding head; `forward` returns B x embedding_size."""

    feature_stages = ("layer1", "layer2", "layer3", "layer4")  # stage outputs (feature taps)
    classifier_path = None  # an embedding network: `fc` projects to the embedding, the classes live in a margin head

    def __init__(self, layers: Sequence[int], embedding_size: int = 512, in_chans: int = 3,
                 input_size: int | Sequence[int] = 112, dropout: float = 0.0, widths=(64, 128, 256, 512)):
        super().__init__()
        self.embedding_size = embedding_size
        self.input_size = as_hw(input_size)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        stages, in_ch = [], widths[0]
        for n, w in zip(layers, widths):
            blocks = [IBasicBlock(in_ch, w, stride=2)] + [IBasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        h, w = self.input_size
        for _ in range(4):
            h, w = _halve(h), _halve(w)
        self.feature_map_size = (h, w)
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[-1] * h * w, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # insightface keeps the final BN scale fixed at 1
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised B x embedding_size embedding."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _factory(name: str):
    layers = IRESNET_LAYERS[name]

    def build(num_classes: int = 0, in_chans: int = 3, embedding_size: int = 512,
              input_size: int | Sequence[int] = 112, dropout: float = 0.0, **_ignored) -> IResNet:
        """Registry factory (docstring set below)."""
        # num_classes is accepted for the registry's signature; the margin head holds the classes
        return IResNet(layers, embedding_size=embedding_size, in_chans=in_chans, input_size=input_size, dropout=dropout)

    build.__name__ = name
    build.__doc__ = f"{name}: IResNet with stages {layers}, returns an `embedding_size`-d embedding (default 512)."
    return build


for _name in IRESNET_LAYERS:
    register_model(_name, embedding=True)(_factory(_name))
