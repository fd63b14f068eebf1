"""Embedding direction matching for face distillation: 1 - cosine of student and teacher embeddings."""
from __future__ import annotations

from torch import nn

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods.emb_mse import embedding_projector
from kdx.losses.face import embedding_cosine_loss


@register_distiller
class EmbeddingCosine(Distiller):
    """Batch mean of 1 - cos(projected student embedding, teacher embedding)."""

    name = "emb_cos"
    needs = frozenset({"embedding"})
    tasks = frozenset({"face"})
    paper = "embedding cosine distillation (cosine feature consistency)"

    def __init__(self, projection: bool = True) -> None:
        super().__init__()
        self.projection = bool(projection)
        self.projector: nn.Module = nn.Identity()

    def setup(self, probe, num_samples=None) -> None:
        self.projector = embedding_projector(probe, self.projection)

    def forward(self, batch):
        student = self.projector(batch["student_embedding"])
        return {"emb_cos": embedding_cosine_loss(student, batch["teacher_embedding"])}
