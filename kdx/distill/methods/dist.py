"""Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher" (DIST): inter- and intra-class relations."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods._logit_common import maybe_standardize
from kdx.losses.logits import check_temperature, dist_loss


@register_distiller
class DIST(Distiller):
    """Pearson-correlation matching of softened predictions, across classes (beta) and across samples (gamma)."""

    name = "dist"
    needs = frozenset({"logits"})
    paper = "Huang et al. 2022, NeurIPS, arXiv:2205.10536"

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 logit_standardization: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.beta, self.gamma = float(beta), float(gamma)
        self.logit_standardization = bool(logit_standardization)

    def forward(self, batch):
        s = maybe_standardize(batch["student_logits"], self.logit_standardization)
        t = maybe_standardize(batch["teacher_logits"], self.logit_standardization)
        return {"dist": dist_loss(s, t, beta=self.beta, gamma=self.gamma, temperature=self.temperature)}
