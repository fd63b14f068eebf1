"""Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (ReviewKD): student stages fused deep-to-shallow by
attention-based fusion (ABF) modules, each output matched to a teacher stage by the hierarchical context loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods._logit_common import warmup_factor
from kdx.distill.methods._stage_pairs import PairedStages
from kdx.errors import ConfigError
from kdx.losses.features import hcl_loss


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv + BN to `mid` channels, fused with the deeper level's residual by two
    sigmoid attention maps (when `fuse`), resized to the teacher's size (nearest), then 3x3 conv + BN."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(output matched to the teacher, residual handed to the next shallower level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[2:]))  # F.interpolate's default: nearest
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size))  # nearest
        return self.conv2(x), x


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """An embedding B x D as a B x D x 1 x 1 map (feature maps unchanged)."""
    return x.reshape(x.shape[0], -1, 1, 1) if x.ndim == 2 else x


@register_distiller
class ReviewKD(PairedStages, Distiller):
    """Levels: the paired stages (shallow to deep) plus the pooled embedding as a last 1 x 1 level, as the
    reference code. Each level's ABF output is compared with the teacher's map at that level by HCL.
    `mid_channels` null: min(512, the student embedding's width), as the reference. The loss is ramped in
    linearly over `warmup_epochs` (the reference: 20)."""

    name = "reviewkd"
    needs = frozenset({"embedding"})
    tasks = frozenset({"classification"})
    paper = "Chen et al. 2021, CVPR, arXiv:2104.09044"

    def __init__(self, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None,
                 mid_channels: int | None = None, warmup_epochs: float = 0) -> None:
        super().__init__()
        if mid_channels is not None and (isinstance(mid_channels, bool) or not isinstance(mid_channels, int)
                                         or mid_channels < 1):
            raise ConfigError(f"distill.mid_channels must be a whole number >= 1 or null, got {mid_channels!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)) or \
                not (math.isfinite(warmup_epochs) and warmup_epochs >= 0):
            raise ConfigError(f"distill.warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
        self.mid_channels, self.warmup_epochs = mid_channels, float(warmup_epochs)
        self._given = (student_layers, teacher_layers)
        self._pairs: list[tuple[str, str]] = []
        self.abfs = nn.ModuleList()

    def _levels(self, batch, role: str) -> list[torch.Tensor]:
        """The maps of one network, shallow to deep, the embedding last as a 1 x 1 map."""
        if f"{role}_embedding" not in batch:
            raise ConfigError(f"method reviewkd reads the {role} embedding, but the host gives none; "
                              f"choose a {role} with a linear classifier head")
        paths = [p[0 if role == "student" else 1] for p in self._pairs]
        maps = [batch[f"{role}_features"][p] for p in paths] + [_as_map(batch[f"{role}_embedding"])]
        for path, m in zip(paths, maps):
            if m.ndim != 4:
                raise ConfigError(f"reviewkd: {role} layer {path!r} gives features of shape {tuple(m.shape)}, not "
                                  f"B x C x H x W; choose convolutional layers (distill.{role}_layers)")
        return maps

    def setup(self, probe, num_samples=None) -> None:
        s_maps, t_maps = self._levels(probe, "student"), self._levels(probe, "teacher")
        mid = self.mid_channels or min(512, s_maps[-1].shape[1])
        last = len(s_maps) - 1
        self.abfs = nn.ModuleList(ABF(s.shape[1], mid, t.shape[1], fuse=i < last)
                                  for i, (s, t) in enumerate(zip(s_maps, t_maps))).to(s_maps[0].device)

    def forward(self, batch):
        if not self._pairs or len(self.abfs) != len(self._pairs) + 1:
            raise RuntimeError("ReviewKD.setup() has not been called")
        s_maps, t_maps = self._levels(batch, "student"), self._levels(batch, "teacher")
        outputs: list[torch.Tensor] = []
        residual = None
        for i in reversed(range(len(s_maps))):  # deepest (the embedding) first, each fused with the one below it
            out, residual = self.abfs[i](s_maps[i], residual, tuple(t_maps[i].shape[2:]))
            outputs.insert(0, out)
        loss = hcl_loss(outputs, t_maps)
        return {"reviewkd": warmup_factor(batch.get("epoch"), self.warmup_epochs) * loss}
