"""Zagoruyko & Komodakis 2017, "Paying More Attention to Attention": match normalised spatial attention maps."""
from __future__ import annotations

import math

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods.fitnet import _no_onnx_teacher
from kdx.distill.stages import pair_layers, stage_layers
from kdx.errors import ConfigError
from kdx.losses.features import attention_transfer_loss


@register_distiller
class AT(Distiller):
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

    def bind(self, student, teacher) -> None:
        _no_onnx_teacher(teacher, self.name)
        s = stage_layers(student, self._given[0], "student", "distill.student_layers")
        t = stage_layers(teacher, self._given[1], "teacher", "distill.teacher_layers")
        self._pairs = pair_layers(s, t)

    def student_layers(self) -> list[str]:
        return [s for s, _ in self._pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self._pairs]

    def forward(self, batch):
        if not self._pairs:
            raise RuntimeError("AT.bind() has not been called")
        s, t = batch["student_features"], batch["teacher_features"]
        return {"at": sum(attention_transfer_loss(s[sp], t[tp], self.p) for sp, tp in self._pairs)}
