"""Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer": match the
distributions of the channels' activation maps (squared MMD, polynomial kernel)."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods._stage_pairs import PairedStages
from kdx.losses.features import nst_loss


@register_distiller
class NST(PairedStages, Distiller):
    """Neuron selectivity transfer summed over every paired stage (default: all declared stages, paired from the
    deep end, as the reference sums over the stage outputs after the stem); channel counts may differ, larger maps
    are pooled. Nothing trainable: `setup` has nothing to build."""

    name = "nst"
    needs = frozenset()  # reads tapped layers only: no logits, embedding, labels or indices
    tasks = frozenset({"classification"})
    paper = "Huang & Wang 2017, arXiv:1707.01219"

    def __init__(self, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None) -> None:
        super().__init__()
        self._given = (student_layers, teacher_layers)  # None: bind() pairs the networks' declared stages
        self._pairs: list[tuple[str, str]] = []

    def forward(self, batch):
        if not self._pairs:
            raise RuntimeError("NST.bind() has not been called")
        s, t = batch["student_features"], batch["teacher_features"]
        return {"nst": sum(nst_loss(s[sp], t[tp]) for sp, tp in self._pairs)}
