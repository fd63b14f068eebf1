"""MobileFaceNet (Chen et al. 2018): a small face-embedding net with a GDC head.

The module tree, and so the state-dict keys and shapes, is that of insightface `arcface_torch`'s
MobileFaceNet, so its checkpoints load as they are (`build_embedding_model("mobilefacenet",
pretrained=PATH, scale=2)`):

    layers.0   conv3x3/2 to 64*scale channels             layers.4   inverted residual /2 to 128*scale
    layers.1   grouped conv3x3, 64 groups                 layers.5   blocks[2] inverted residuals
               (or blocks[0] inverted residuals)          layers.6   inverted residual /2
    layers.2   inverted residual /2                       layers.7   blocks[3] inverted residuals
    layers.3   blocks[1] inverted residuals               conv_sep   conv1x1 to 512
    features   GDC: depthwise conv over the whole final map, flatten, linear (no bias), BN1d

The inverted residuals expand to 128, 128, 256, 256, 512, 256 channels (stage by stage, whatever the
scale). arcface_torch's `mbf` is scale=2, blocks=(1, 4, 6, 2) (~2.0M parameters at 512-d) and
`mbf_large` is scale=4, blocks=(2, 8, 12, 4); see ARCFACE_TORCH_VARIANTS or pass `arch="mbf"`.
kdx's default is scale=1, the paper's size (~1.0M parameters at 128-d, ~1.2M at 512-d). The default
embedding size is 512 (insightface's choice, so it distils from a 512-d IResNet teacher without a
projection). arcface_torch fixes the GDC kernel at 7x7 (112x112 inputs); here it is the final map of
`input_size`, so 112x112 gives the same shapes and other sizes still build.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdx.errors import ConfigError
from kdx.configs import as_hw
from kdx.models.registry import register_model

ARCFACE_TORCH_VARIANTS = {"mbf": {"scale": 2, "blocks": (1, 4, 6, 2)},
                          "mbf_large": {"scale": 4, "blocks": (2, 8, 12, 4)}}
"""arcface_torch `get_model` names -> MobileFaceNet arguments building the same network."""

STEM_GROUPS = 64  # groups of the stem's second conv (depthwise at scale 1, 64 groups at any scale)


class _Layers(nn.Module):
    """A module whose work is its `layers` Sequential (the nesting that arcface_torch's keys carry)."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`layers` applied to `x`."""
        return self.layers(x)


class ConvBNPReLU(_Layers):
    """Conv (no bias) + BatchNorm + PReLU."""

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=0, groups=1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.PReLU(out_ch))


class ConvBN(_Layers):
    """Conv (no bias) + BatchNorm, no activation (linear bottleneck)."""

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=0, groups=1):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch))


class DepthWise(_Layers):
    """Inverted residual: expand 1x1 -> depthwise 3x3 -> project 1x1, with an optional identity shortcut."""

    def __init__(self, in_ch: int, out_ch: int, expanded: int, stride: int = 1, residual: bool = False):
        super().__init__(ConvBNPReLU(in_ch, expanded),
                         ConvBNPReLU(expanded, expanded, 3, stride, 1, groups=expanded),
                         ConvBN(expanded, out_ch))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, plus the input when residual."""
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(_Layers):
    """`n` same-width residual inverted-residual blocks in a row."""

    def __init__(self, channels: int, n: int, expanded: int):
        super().__init__(*(DepthWise(channels, channels, expanded, residual=True) for _ in range(n)))


class GDC(_Layers):
    """Global depthwise convolution over the whole map, then flatten, linear and BN1d to the embedding."""

    def __init__(self, channels: int, map_size: tuple[int, int], embedding_size: int):
        super().__init__(ConvBN(channels, channels, map_size, 1, 0, groups=channels), nn.Flatten(1),
                         nn.Linear(channels, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))


class MobileFaceNet(nn.Module):
    """MobileFaceNet; `forward` returns B x embedding_size (unnormalised)."""

    feature_stages = ("layers.1", "layers.3", "layers.5", "conv_sep")  # the last output of each resolution
    classifier_path = None  # an embedding network: the classes live in a margin head

    def __init__(self, embedding_size: int = 512, in_chans: int = 3, input_size: int | Sequence[int] = 112,
                 blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 1):
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 0 for b in blocks):
            raise ConfigError(f"MobileFaceNet blocks must be 4 non-negative counts, got {tuple(blocks)!r}")
        if not isinstance(scale, int) or scale < 1:
            raise ConfigError(f"MobileFaceNet scale must be a positive integer, got {scale!r}")
        self.embedding_size = embedding_size
        self.input_size = as_hw(input_size)
        self.scale, self.blocks = scale, tuple(int(b) for b in blocks)
        c64, c128 = 64 * scale, 128 * scale
        stem = (ConvBNPReLU(c64, c64, 3, 1, 1, groups=STEM_GROUPS) if blocks[0] == 1
                else Residual(c64, blocks[0], 128))
        self.layers = nn.ModuleList([
            ConvBNPReLU(in_chans, c64, 3, 2, 1), stem,
            DepthWise(c64, c64, 128, stride=2), Residual(c64, blocks[1], 128),
            DepthWise(c64, c128, 256, stride=2), Residual(c128, blocks[2], 256),
            DepthWise(c128, c128, 512, stride=2), Residual(c128, blocks[3], 256)])
        self.conv_sep = ConvBNPReLU(c128, 512)
        h, w = self.input_size
        for _ in range(4):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.feature_map_size = (h, w)  # 7x7 at 112x112, arcface_torch's fixed GDC kernel
        self.features = GDC(512, (h, w), embedding_size)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised B x embedding_size embedding."""
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


@register_model("mobilefacenet", embedding=True)
def mobilefacenet(num_classes: int = 0, in_chans: int = 3, embedding_size: int = 512,
                  input_size: int | Sequence[int] = 112, arch: str | None = None, **kwargs) -> MobileFaceNet:
    """MobileFaceNet returning an `embedding_size`-d embedding (default 512; 128 is the paper's).

    `arch="mbf"` or `"mbf_large"` sets scale and blocks to arcface_torch's network of that name.
    """
    kwargs.pop("pretrained", None)
    if arch is not None:
        if arch not in ARCFACE_TORCH_VARIANTS:
            raise ConfigError(f"unknown MobileFaceNet arch {arch!r}; choose one of {sorted(ARCFACE_TORCH_VARIANTS)}")
        clash = sorted(set(kwargs) & set(ARCFACE_TORCH_VARIANTS[arch]))
        if clash:
            raise ConfigError(f"MobileFaceNet arch={arch!r} sets {clash} itself; drop them or drop arch")
        kwargs.update(ARCFACE_TORCH_VARIANTS[arch])
    return MobileFaceNet(embedding_size=embedding_size, in_chans=in_chans, input_size=input_size, **kwargs)

