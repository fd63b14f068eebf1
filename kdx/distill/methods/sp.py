"""Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation": match in-batch similarity matrices."""
from __future__ import annotations

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.stages import pair_layers, stage_layers
from kdx.errors import ConfigError
from kdx.losses.relations import sp_loss


@register_distiller
class SP(Distiller):
    """Similarity-preserving loss on one feature map each (default: the deepest paired stages, as the reference
    uses the last stage); channel and spatial sizes may differ."""

    name = "sp"
    needs = frozenset()
    tasks = frozenset({"classification"})
    paper = "Tung & Mori 2019, ICCV, arXiv:1907.09682"

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None) -> None:
        super().__init__()
        self._student_path = student_layer
        self._teacher_path = teacher_layer

    def bind(self, student, teacher) -> None:
        if teacher is None:
            raise ConfigError("distill.method=sp reads a teacher feature map, but this teacher has no inspectable "
                              "layers (an ONNX model); use a torch teacher or a method on outputs (e.g. distill=pkt)")
        s = stage_layers(student, self._student_path, "student", "distill.student_layer")
        t = stage_layers(teacher, self._teacher_path, "teacher", "distill.teacher_layer")
        self._student_path, self._teacher_path = pair_layers(s, t)[-1]

    def student_layers(self) -> list[str]:
        return [self._student_path] if self._student_path else []

    def teacher_layers(self) -> list[str]:
        return [self._teacher_path] if self._teacher_path else []

    def forward(self, batch):
        s = batch["student_features"][self._student_path]
        t = batch["teacher_features"][self._teacher_path]
        return {"sp": sp_loss(s, t)}
