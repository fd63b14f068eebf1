"""Small plain CNNs for 28x28 images (Fashion-MNIST-sized), fast enough for tests and CPU demos."""
from __future__ import annotations

import torch
from torch import nn

from kdx.models.contract import ClassifierNet
from kdx.models.registry import register_model


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(ClassifierNet):
    """conv-conv-pool stages of the given widths, global average pooling and a linear head."""

    def __init__(self, widths: tuple[int, ...] = (32, 64), num_classes: int = 10, in_chans: int = 1,
                 hidden: int = 0) -> None:
        super().__init__()
        layers, cin = [], in_chans
        for w in widths:
            layers += [_conv_bn(cin, w), _conv_bn(w, w), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.feature_stages = tuple(f"features.{3 * i + 2}" for i in range(len(widths)))  # after each pooling
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True)) if hidden else nn.Identity()
        self.num_features = hidden or cin
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features."""
        return self.neck(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def cnn_tiny(num_classes: int = 10, in_chans: int = 1, **_: object) -> SmallCNN:
    """Two stages of 8 and 16 channels (~4k parameters at 10 classes): the smallest student."""
    return SmallCNN((8, 16), num_classes, in_chans)


@register_model
def cnn_small(num_classes: int = 10, in_chans: int = 1, **_: object) -> SmallCNN:
    """Two stages of 16 and 32 channels (~17k parameters at 10 classes)."""
    return SmallCNN((16, 32), num_classes, in_chans)


@register_model
def cnn_medium(num_classes: int = 10, in_chans: int = 1, **_: object) -> SmallCNN:
    """Three stages of 32, 64 and 128 channels with a 256-unit hidden layer (~0.32M parameters)."""
    return SmallCNN((32, 64, 128), num_classes, in_chans, hidden=256)

