"""MobileFaceNet (Chen et al. 2018): a ~1M-parameter face-embedding net with a GDC head.

Layout as in insightface `arcface_torch` (`mbf`, scale 1): conv3x3/2 - depthwise conv -
inverted-residual stages (1, 4, 6, 2 blocks with expansions 128, 256, 256 channels) - conv1x1 to
512 - global depthwise conv over the whole final map (GDC) - linear - BN1d. The default embedding
size is 512 (insightface's choice, so it distils from a 512-d IResNet teacher without a projection);
pass embedding_size=128 for the paper's 128-d net (~1.0M parameters; 512-d has ~1.2M).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdx.models.registry import register_model


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class ConvBNPReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + PReLU."""

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=0, groups=1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.PReLU(out_ch))


class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm, no activation (linear bottleneck)."""

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=0, groups=1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch))


class DepthWise(nn.Module):
    """Inverted residual: expand 1x1 -> depthwise 3x3 -> project 1x1, with an optional identity shortcut."""

    def __init__(self, in_ch: int, out_ch: int, expanded: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBNPReLU(in_ch, expanded),
                                    ConvBNPReLU(expanded, expanded, 3, stride, 1, groups=expanded),
                                    ConvBN(expanded, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, plus the input when residual."""
        out = self.layers(x)
        return x + out if self.residual else out


class GDC(nn.Module):
    """Global depthwise convolution over the whole map, then linear + BN1d to the embedding."""

    def __init__(self, channels: int, map_size: tuple[int, int], embedding_size: int):
        super().__init__()
        self.conv = ConvBN(channels, channels, map_size, 1, 0, groups=channels)
        self.linear = nn.Linear(channels, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x embedding_size from the final feature map."""
        return self.bn(self.linear(torch.flatten(self.conv(x), 1)))


class MobileFaceNet(nn.Module):
    """MobileFaceNet; `forward` returns B x embedding_size (unnormalised)."""

    def __init__(self, embedding_size: int = 512, in_chans: int = 3, input_size: int | Sequence[int] = 112,
                 blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 1):
        super().__init__()
        self.embedding_size = embedding_size
        self.input_size = _pair(input_size)
        c64, c128 = 64 * scale, 128 * scale
        layers: list[nn.Module] = [ConvBNPReLU(in_chans, c64, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(ConvBNPReLU(c64, c64, 3, 1, 1, groups=c64))
        else:
            layers += [DepthWise(c64, c64, 128, residual=True) for _ in range(blocks[0])]
        layers.append(DepthWise(c64, c64, 128, stride=2))
        layers += [DepthWise(c64, c64, 128, residual=True) for _ in range(blocks[1])]
        layers.append(DepthWise(c64, c128, 256, stride=2))
        layers += [DepthWise(c128, c128, 256, residual=True) for _ in range(blocks[2])]
        layers.append(DepthWise(c128, c128, 512, stride=2))
        layers += [DepthWise(c128, c128, 256, residual=True) for _ in range(blocks[3])]
        layers.append(ConvBNPReLU(c128, 512))
        self.body = nn.Sequential(*layers)
        h, w = self.input_size
        for _ in range(4):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.feature_map_size = (h, w)
        self.features = GDC(512, (h, w), embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised B x embedding_size embedding."""
        return self.features(self.body(x))


@register_model("mobilefacenet")
def mobilefacenet(num_classes: int = 0, in_chans: int = 3, embedding_size: int = 512,
                  input_size: int | Sequence[int] = 112, **kwargs) -> MobileFaceNet:
    """MobileFaceNet returning an `embedding_size`-d embedding (default 512; 128 is the paper's)."""
    kwargs.pop("pretrained", None)
    return MobileFaceNet(embedding_size=embedding_size, in_chans=in_chans, input_size=input_size, **kwargs)


FACE_NETS_MOBILE = {"mobilefacenet": mobilefacenet}
