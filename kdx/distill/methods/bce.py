"""Logistic soft targets: each class an independent yes/no question answered by the teacher's sigmoid."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.losses.logits import bce_soft_loss, check_temperature


@register_distiller
class SoftBCE(Distiller):
    """Mean over batch and classes of BCE-with-logits(s / T, sigmoid(t / T))."""

    name = "bce"
    needs = frozenset({"logits"})
    paper = "sigmoid soft targets, as in multi-label KD (e.g. Ridnik et al. 2021, ASL)"

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, batch):
        return {"bce": bce_soft_loss(batch["student_logits"], batch["teacher_logits"], self.temperature)}
