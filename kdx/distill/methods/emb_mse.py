"""Embedding regression for face distillation: mean squared error between student and teacher embeddings."""
from __future__ import annotations

from torch import nn

from kdx.distill.base import Distiller, register_distiller
from kdx.losses.face import embedding_mse_loss, make_projector


def embedding_projector(probe, projection: bool) -> nn.Module:
    """A learned student -> teacher linear map when the probe's embedding sizes differ and `projection` is set;
    identity when they match; a ConfigError naming both sizes otherwise."""
    s_dim, t_dim = probe["student_embedding"].shape[1], probe["teacher_embedding"].shape[1]
    return make_projector(s_dim, t_dim, bool(projection) and s_dim != t_dim)


@register_distiller
class EmbeddingMSE(Distiller):
    """MSE over batch and dimensions of the (projected) student embedding and the teacher's; `normalize`
    L2-normalises both first (compares directions only)."""

    name = "emb_mse"
    needs = frozenset({"embedding"})
    tasks = frozenset({"face"})
    paper = "embedding regression (L2 feature distillation)"

    def __init__(self, projection: bool = True, normalize: bool = False) -> None:
        super().__init__()
        self.projection, self.normalize = bool(projection), bool(normalize)
        self.projector: nn.Module = nn.Identity()

    def setup(self, probe, num_samples=None) -> None:
        self.projector = embedding_projector(probe, self.projection)

    def forward(self, batch):
        student = self.projector(batch["student_embedding"])
        return {"emb_mse": embedding_mse_loss(student, batch["teacher_embedding"], normalize=self.normalize)}
