"""Face distillation as a Lightning module: a face student trained on its own margin loss plus weighted
distillers (kdx.distill) from a frozen face teacher (kdx.distill.teachers: a kdx checkpoint or an ONNX model),
asked through its teacher source (kdx.distill.source)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from kdx.distill import DistillerSet
from kdx.distill.settings import ALPHA_DEFAULTS
from kdx.distill.source import TeacherSource, face_source
from kdx.distill.teachers import FaceTeacher
from kdx.data.batch import as_train_batch
from kdx.lit.distill import DistillationMixin, distiller_set
from kdx.lit.face import FaceModule


class FaceDistillationModule(DistillationMixin, FaceModule):
    """A face student trained on its own margin loss plus weighted distillers (kdx.distill) from a frozen teacher.

    Total = alpha * sum_m weight_m * loss_m + (1 - alpha) * margin. The distillers' trainable parts (a
    student -> teacher embedding projection, say) are trained and saved with the student, but are not part
    of the exported embedding network. `teacher` is a TeacherSource built for this student
    (kdx.distill.source.face_source: what kdx.tasks passes, its cache included), or a FaceTeacher, from which the
    module builds a source without a cache for the methods of `distill` (default emb_cos). Margin-head logits are
    offered to the distillers only when the teacher has a head trained on this run's identities
    (`shared_identities`, decided where the source is built).
    """

    def __init__(self, net: nn.Module, teacher: TeacherSource | FaceTeacher, num_classes: int,
                 distill: DistillerSet | Mapping[str, Any] | None = None, alpha: float = ALPHA_DEFAULTS["face"],
                 save_teacher: bool = False, shared_identities: bool = False,
                 example_input: torch.Tensor | None = None, num_samples: int | None = None,
                 **face_kwargs: Any) -> None:
        super().__init__(net, num_classes, **face_kwargs)
        if isinstance(teacher, TeacherSource):
            if distill is not None or shared_identities:
                raise ValueError("distill and shared_identities are decided when the teacher source is built "
                                 "(face_source(teacher, distillers, student, shared_identities=...)); leave them "
                                 "out when `teacher` is a TeacherSource")
            source = teacher
        else:
            source = face_source(teacher, distiller_set(distill, "emb_cos", "face"), net,
                                 shared_identities=shared_identities)
        self.configure_distillation(source, net, alpha, save_teacher)
        self.wants_logits = "logits" in self.distillers.needs
        if self.distill_alpha == 1.0 and not self.wants_logits:  # no margin loss: the head would get no gradient,
            self.head.requires_grad_(False)                      # which stalls DDP; keep it out of the optimizer
        if example_input is None:
            example_input = torch.zeros(2, int(self.model_meta.get("in_chans", 3)), *self.input_size)
        self.setup_distillers(example_input, self._student_outputs, num_samples, num_classes)

    def _student_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embed(x)
        return {"embedding": emb, "logits": self.head(emb)} if self.wants_logits else {"embedding": emb}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        b = as_train_batch(batch)
        db = self.distill_batch(b, self._student_outputs)
        y = b["labels"]
        own = self.own_losses(db["student_embedding"], y) if self.distill_alpha < 1 else {}
        weighted, raw = self.weighed_losses(own, db, hard_keys=("margin",))
        return self.log_terms(weighted, batch_size=y.shape[0], raw=raw)
