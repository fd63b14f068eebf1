"""Hinton et al. 2015 KD on the face margin heads' logits (scaled cosines to the identities, no margin)."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.losses.logits import check_temperature, kd_loss


@register_distiller
class FaceLogitKD(Distiller):
    """T^2 * KL(softmax(t/T) || softmax(s/T)) of the margin heads' logits; needs a teacher trained on the same
    identities (a kdx face checkpoint of a run on this data)."""

    name = "logit_kd"
    needs = frozenset({"embedding", "logits"})
    tasks = frozenset({"face"})
    paper = "Hinton et al. 2015, arXiv:1503.02531"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, batch):
        return {"logit_kd": kd_loss(batch["student_logits"], batch["teacher_logits"], self.temperature)}
