"""Face-embedding distillation terms: pure functions of student and teacher embeddings (B x D)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdx.errors import ConfigError


def check_embedding_dims(student_dim: int, teacher_dim: int, projection: bool) -> None:
    """Raise a ConfigError when student and teacher embedding sizes differ and no projection is set."""
    if student_dim != teacher_dim and not projection:
        raise ConfigError(f"embedding dimension mismatch: student {student_dim} vs teacher {teacher_dim}; "
                          "set distill.projection=true")


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor, same_dim: bool = True) -> None:
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"embeddings must be B x D with equal B, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if same_dim:
        check_embedding_dims(student.shape[1], teacher.shape[1], projection=False)


def embedding_mse_loss(student: torch.Tensor, teacher: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Mean squared error over batch and dimensions; `normalize` L2-normalises both embeddings first."""
    _check_shapes(student, teacher)
    s, t = student.float(), teacher.float()
    if normalize:
        s, t = F.normalize(s), F.normalize(t)  # unit L2 rows (F.normalize's defaults p=2, dim=1)
    return F.mse_loss(s, t)


def embedding_cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Batch mean of 1 - cos(student_i, teacher_i)."""
    _check_shapes(student, teacher)
    return (1.0 - F.cosine_similarity(student.float(), teacher.float())).mean()  # cosines of rows (dim=1)


def pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """B x B matrix of cosine similarities within a batch."""
    z = F.normalize(embeddings.float())  # unit L2 rows
    return z @ z.t()


def relational_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the in-batch cosine-similarity matrices of student and teacher (dims may differ)."""
    _check_shapes(student, teacher, same_dim=False)
    return F.mse_loss(pairwise_cosine(student), pairwise_cosine(teacher))


class EmbeddingProjector(nn.Module):
    """Learned linear map from the student's embedding size to the teacher's (trained with the student)."""

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True):
        super().__init__()
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias)

    def forward(self, student_embeddings: torch.Tensor) -> torch.Tensor:
        """Student embeddings mapped to the teacher's size."""
        return self.proj(student_embeddings)


def make_projector(student_dim: int, teacher_dim: int, projection: bool) -> nn.Module:
    """An EmbeddingProjector when `projection` is set, identity when dims match, else a ConfigError."""
    check_embedding_dims(student_dim, teacher_dim, projection)
    return EmbeddingProjector(student_dim, teacher_dim) if projection else nn.Identity()


EMBEDDING_LOSSES = {"mse": embedding_mse_loss, "cosine": embedding_cosine_loss, "relational": relational_kd_loss}
