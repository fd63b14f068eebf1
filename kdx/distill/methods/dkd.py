"""Zhao et al. 2022, "Decoupled Knowledge Distillation": target-class and non-target-class KD, weighted apart."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods._logit_common import maybe_standardize, warmup_factor
from kdx.losses.logits import check_temperature, dkd_loss


@register_distiller
class DKD(Distiller):
    """`tckd_weight` is the paper's alpha (TCKD), `beta` its NCKD weight; ramped in over `warmup_epochs`."""

    name = "dkd"
    needs = frozenset({"logits", "labels"})
    tasks = frozenset({"classification"})
    paper = "Zhao et al. 2022, CVPR, arXiv:2203.08679"

    def __init__(self, temperature: float = 4.0, tckd_weight: float = 1.0, beta: float = 8.0,
                 warmup_epochs: float = 0, logit_standardization: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.tckd_weight, self.beta = float(tckd_weight), float(beta)
        self.warmup_epochs = float(warmup_epochs)
        self.logit_standardization = bool(logit_standardization)

    def forward(self, batch):
        s = maybe_standardize(batch["student_logits"], self.logit_standardization)
        t = maybe_standardize(batch["teacher_logits"], self.logit_standardization)
        loss = dkd_loss(s, t, batch["labels"], self.temperature, alpha=self.tckd_weight, beta=self.beta)
        return {"dkd": warmup_factor(batch.get("epoch"), self.warmup_epochs) * loss}
