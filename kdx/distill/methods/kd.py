"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network": T^2 * KL(teacher_T || student_T)."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods._logit_common import maybe_standardize
from kdx.losses.logits import check_temperature, kd_loss


@register_distiller
class KD(Distiller):
    """Soft-label KD on logits; `logit_standardization` z-scores both logits first (Sun et al. 2024)."""

    name = "kd"
    needs = frozenset({"logits"})
    paper = "Hinton et al. 2015, arXiv:1503.02531"

    def __init__(self, temperature: float = 4.0, logit_standardization: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.logit_standardization = bool(logit_standardization)

    def forward(self, batch):
        s = maybe_standardize(batch["student_logits"], self.logit_standardization)
        t = maybe_standardize(batch["teacher_logits"], self.logit_standardization)
        return {"kd": kd_loss(s, t, self.temperature)}
