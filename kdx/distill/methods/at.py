"""Zagoruyko & Komodakis 2017, "Paying More Attention to Attention": match normalised spatial attention maps."""
from __future__ import annotations

import math

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods._stage_pairs import PairedStages
from kdx.errors import ConfigError
from kdx.losses.features import attention_transfer_loss


@register_distiller
class AT(PairedStages, Distiller):
    """Attention transfer summed over every paired stage (default: all declared stages, paired from the deep
    end, as the reference sums over the stage outputs); channel counts may differ, larger maps are pooled."""

    name = "at"
    needs = frozenset()
    tasks = frozenset({"classification"})
    paper = "Zagoruyko & Komodakis 2017, ICLR, arXiv:1612.03928"

    def __init__(self, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None,
                 p: float = 2) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 0):
            raise ConfigError(f"distill.p must be a power > 0 (the paper uses 2), got {p!r}")
        self.p = float(p)
        self._given = (student_layers, teacher_layers)
        self._pairs: list[tuple[str, str]] = []

    def forward(self, batch):
        if not self._pairs:
            raise RuntimeError("AT.bind() has not been called")
        s, t = batch["student_features"], batch["teacher_features"]
        return {"at": sum(attention_transfer_loss(s[sp], t[tp], self.p) for sp, tp in self._pairs)}
