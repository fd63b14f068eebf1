"""Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?": regress the teacher's logits (MSE)."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.losses.logits import logit_mse_loss


@register_distiller
class LogitMSE(Distiller):
    """Mean squared error between raw student and teacher logits (no temperature)."""

    name = "mse"
    needs = frozenset({"logits"})
    paper = "Ba & Caruana 2014, NeurIPS, arXiv:1312.6184"

    def forward(self, batch):
        return {"mse": logit_mse_loss(batch["student_logits"], batch["teacher_logits"])}
