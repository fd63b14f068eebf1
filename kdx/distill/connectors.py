"""Trainable connectors that map a student feature map onto a teacher feature map's shape.

`build_connector(kind, student_shape, teacher_shape, key)` with `kind`:

- `conv1x1`: a 1x1 convolution (no bias) followed by batch norm: the FitNets regressor; channels change,
  the spatial size is kept;
- `convreg`: the regressor of the RepDistiller / mdistiller FitNet code (`ConvReg`): a 3x3 stride-2 convolution
  when the student map is twice the teacher's size, a 4x4 stride-2 transposed convolution when it is half, else
  a valid convolution of kernel (1 + dH) x (1 + dW), each followed by batch norm and ReLU (the paper asks the
  regressor to share the hint layer's non-linearity);
- `none`: the identity, for maps that already agree in channels.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from kdx.errors import ConfigError

CONNECTORS = ("conv1x1", "convreg", "none")


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


class ConvReg(nn.Module):
    """Conv (chosen by the spatial ratio) + BN + ReLU, mapping a student map to the teacher's channels and size."""

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = conv, nn.BatchNorm2d(channels), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def connector_output_shape(kind: str, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape (B x C x H x W) of the connector's output for a student map of `student_shape`."""
    s, t = _shape(student_shape), _shape(teacher_shape)
    if kind == "none":
        return s
    if kind == "conv1x1":
        return (s[0], t[1], *s[2:])
    return (s[0], *t[1:])


def build_connector(kind: str, student_shape: Sequence[int], teacher_shape: Sequence[int],
                    key: str = "distill") -> nn.Module:
    """A connector of `kind` from student maps of `student_shape` to the teacher's channels (B x C x H x W)."""
    s, t = _shape(student_shape), _shape(teacher_shape)
    if kind not in CONNECTORS:
        raise ConfigError(f"{key}.connector={kind!r} is not a connector; choose one of {', '.join(CONNECTORS)}")
    if len(s) != 4 or len(t) != 4:
        raise ConfigError(f"{key}.connector={kind} needs B x C x H x W feature maps, got student {s} and teacher {t}; "
                          f"choose convolutional layers ({key}.student_layer / {key}.teacher_layer)")
    s_c, t_c = s[1], t[1]
    if kind == "none":
        if s_c != t_c:
            raise ConfigError(f"student features of shape {s} and teacher features of shape {t} differ in channels; "
                              f"set {key}.connector=conv1x1")
        return nn.Identity()
    if kind == "conv1x1":
        return nn.Sequential(nn.Conv2d(s_c, t_c, kernel_size=1, bias=False), nn.BatchNorm2d(t_c))
    (s_h, s_w), (t_h, t_w) = s[2:], t[2:]
    if s_h == 2 * t_h and s_w == 2 * t_w:
        conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif 2 * s_h == t_h and 2 * s_w == t_w:
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ConfigError(f"{key}.connector=convreg cannot map student features of shape {s} onto teacher features "
                          f"of shape {t} (the teacher map is larger, but not twice the size); set {key}.spatial=pool")
    return ConvReg(conv, t_c)
