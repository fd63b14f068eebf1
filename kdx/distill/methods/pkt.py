"""Passalis & Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer" (PKT)."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.losses.relations import pkt_loss


@register_distiller
class PKT(Distiller):
    """KL between teacher's and student's cosine-kernel conditional probabilities over the batch's embeddings."""

    name = "pkt"
    needs = frozenset({"embedding"})
    tasks = frozenset({"classification", "face"})
    paper = "Passalis & Tefas 2018, ECCV, arXiv:1803.10837"

    def forward(self, batch):
        return {"pkt": pkt_loss(batch["student_embedding"], batch["teacher_embedding"])}
