"""Face distillation as a Lightning module: a face student trained on its own margin loss plus weighted
distillers (kdx.distill) from a frozen face teacher (kdx.distill.teachers: a kdx checkpoint or an ONNX model)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from kdx.distill import DistillerSet
from kdx.distill.teachers import FaceTeacher
from kdx.data.batch import as_train_batch
from kdx.lit.distill import DistillationMixin
from kdx.lit.face import FaceModule


class FaceDistillationModule(DistillationMixin, FaceModule):
    """A face student trained on its own margin loss plus weighted distillers (kdx.distill) from a frozen teacher.

    Total = alpha * sum_m weight_m * loss_m + (1 - alpha) * margin. The distillers' trainable parts (a
    student -> teacher embedding projection, say) are trained and saved with the student, but are not part
    of the exported embedding network. Margin-head logits are offered to the distillers only when the
    teacher has a head trained on this run's identities (`shared_identities`).
    """

    def __init__(self, net: nn.Module, teacher: FaceTeacher, num_classes: int,
                 distill: DistillerSet | Mapping[str, Any] | None = None, alpha: float = 0.5,
                 save_teacher: bool = False, shared_identities: bool = False,
                 example_input: torch.Tensor | None = None, num_samples: int | None = None,
                 **face_kwargs: Any) -> None:
        super().__init__(net, num_classes, **face_kwargs)
        self.configure_distillation(teacher, distill if distill is not None else {"method": "emb_cos"}, alpha,
                                    save_teacher, task="face")
        self.offers_logits = teacher.head is not None and bool(shared_identities)
        provided = {"embedding", "labels", "indices"} | ({"logits"} if self.offers_logits else set())
        why = "the teacher has no margin head (an ONNX model or a bare network)" if teacher.head is None else \
            "the teacher's training identities differ from this run's"
        self.distillers.check_support(provided, "face distillation", why={
            "logits": f"{why}; logits need a teacher trained on the same identity set (teacher.ckpt of a task=face "
                      "run on this data)"})
        self.wants_logits = "logits" in self.distillers.needs
        if self.distill_alpha == 1.0 and not self.wants_logits:  # no margin loss: the head would get no gradient,
            self.head.requires_grad_(False)                      # which stalls DDP; keep it out of the optimizer
        self.attach_taps(net, None if teacher.is_onnx else teacher.net)
        if example_input is None:
            example_input = torch.zeros(2, int(self.model_meta.get("in_chans", 3)), *self.input_size)
        self.setup_distillers(example_input, self._student_outputs, self.teacher_outputs, num_samples, num_classes)

    def _student_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embed(x)
        return {"embedding": emb, "logits": self.head(emb)} if self.wants_logits else {"embedding": emb}

    def teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen teacher's outputs for `x`: its embedding, and its margin-head logits when a method reads them."""
        out = self.teacher_forward(x)
        return out if self.wants_logits else {"embedding": out["embedding"]}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        b = as_train_batch(batch)
        db = self.distill_batch(b, self._student_outputs, self.teacher_outputs)
        y = b["labels"]
        own = self.own_losses(db["student_embedding"], y) if self.distill_alpha < 1 else {}
        weighted, raw = self.weighed_losses(own, db, hard_keys=("margin",))
        return self.log_terms(weighted, batch_size=y.shape[0], raw=raw)
