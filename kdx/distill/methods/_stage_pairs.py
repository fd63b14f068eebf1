"""Shared by the methods that compare paired student/teacher stages (not a method: files starting with _ hold helpers)."""
from __future__ import annotations

from kdx.distill.methods.fitnet import _no_onnx_teacher
from kdx.distill.stages import pair_layers, stage_layers


class PairedStages:
    """bind/student_layers/teacher_layers for a Distiller holding `_given` = (student layers, teacher layers) or None."""

    def bind(self, student, teacher) -> None:
        _no_onnx_teacher(teacher, self.name)
        s = stage_layers(student, self._given[0], "student", "distill.student_layers")
        t = stage_layers(teacher, self._given[1], "teacher", "distill.teacher_layers")
        self._pairs = pair_layers(s, t)

    def student_layers(self) -> list[str]:
        return [s for s, _ in self._pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self._pairs]
