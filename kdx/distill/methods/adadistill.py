"""Boutros et al. 2024, "AdaDistill: Adaptive Knowledge Distillation for Deep Face Recognition" (ECCV).

The student is trained with an ArcFace/CosFace softmax whose class centres are an adaptive moving average of
the teacher's normalised embeddings per identity (see kdx.losses.adadistill). With distill.alpha=1 it
replaces the student's own margin loss, as in the paper.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods.emb_mse import embedding_projector
from kdx.errors import ConfigError
from kdx.losses.adadistill import adadistill_update, centre_margin_loss, check_margin


def _gather(x: torch.Tensor) -> torch.Tensor:
    """`x` (detached) from every DDP rank, concatenated in rank order; `x` itself outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    padded = x.new_zeros((int(max(s.item() for s in sizes)), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


@register_distiller
class AdaDistill(Distiller):
    """Margin softmax against teacher-built class centres (buffer `centres`, identities x teacher size).

    In training mode each forward first moves the centres of the batch's identities towards their teacher
    embeddings (weights from the student-teacher and centre-teacher cosines; under DDP with every rank's
    samples, so the ranks' centres agree), then returns the margin loss against the updated centres. A
    student of another embedding size is mapped to the teacher's by a learned linear projection.
    """

    name = "adadistill"
    needs = frozenset({"embedding", "labels"})
    tasks = frozenset({"face"})
    paper = "Boutros et al. 2024, ECCV, arXiv:2407.01332"

    def __init__(self, margin_type: str = "arcface", margin: float = 0.45, scale: float = 64.0,
                 projection: bool = True) -> None:
        super().__init__()
        self.margin_type, self.margin, self.scale = check_margin(margin_type, margin, scale)
        self.projection = bool(projection)
        self.projector: nn.Module = nn.Identity()
        self.register_buffer("centres", torch.empty(0, 0))

    def setup(self, probe, num_samples=None) -> None:
        num_classes = probe.get("num_classes")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(f"distillation method 'adadistill' needs the number of training identities, got "
                              f"{num_classes!r}; use it in task=face_distill, whose host passes it")
        self.projector = embedding_projector(probe, self.projection)
        dim = probe["teacher_embedding"].shape[1]
        self.centres = 0.01 * torch.randn(num_classes, dim)  # the authors' initialisation, N(0, 0.01^2)

    def forward(self, batch):
        if self.centres.numel() == 0:
            raise RuntimeError("AdaDistill.setup() has not been called: the class centres are sized from its probe")
        student = self.projector(batch["student_embedding"])
        teacher, labels = batch["teacher_embedding"], batch["labels"]
        with torch.autocast(device_type=student.device.type, enabled=False):  # cosines and margins in float32
            student = student.float()
            if self.training:
                self.centres.copy_(adadistill_update(self.centres, _gather(student), _gather(teacher.float()),
                                                     _gather(labels)))
            loss = centre_margin_loss(student, self.centres, labels, self.margin, self.scale, self.margin_type)
        return {"adadistill": loss}
