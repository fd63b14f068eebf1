"""Relational face distillation: match the in-batch cosine-similarity matrices of student and teacher."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.losses.face import relational_kd_loss


@register_distiller
class RelationalCosine(Distiller):
    """MSE between the B x B cosine-similarity matrices of student and teacher embeddings (sizes may differ)."""

    name = "relational"
    needs = frozenset({"embedding"})
    tasks = frozenset({"face"})
    paper = "in-batch similarity matching, cf. Tung & Mori 2019 (SP), ICCV, arXiv:1907.09682"

    def forward(self, batch):
        return {"relational": relational_kd_loss(batch["student_embedding"], batch["teacher_embedding"])}
