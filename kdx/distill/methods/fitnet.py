"""Romero et al. 2015, "FitNets: Hints for Thin Deep Nets": regress a student stage onto a teacher stage (MSE)."""
from __future__ import annotations

import torch
from torch import nn

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.connectors import CONNECTORS, build_connector, connector_output_shape
from kdx.distill.stages import pair_layers, stage_layers
from kdx.errors import ConfigError
from kdx.losses.features import fitnet_loss, pool_to_smaller

SPATIAL = ("error", "pool")


def _no_onnx_teacher(teacher: nn.Module | None, name: str) -> None:
    if teacher is None:
        raise ConfigError(f"distill.method={name} reads teacher feature maps, but this teacher has no inspectable "
                          f"layers (an ONNX model); use a torch teacher or a method on outputs (e.g. distill=kd)")


@register_distiller
class FitNet(Distiller):
    """Hint loss of one stage pair through a trainable connector (default: a 1x1 conv + BN regressor).

    The default pair is the middle one of the paired stages (index (n-1)//2, the reference's hint layer 2 of
    a CIFAR ResNet: its second stage). Like the RepDistiller / mdistiller code, hint and task are trained
    together (not the paper's two-stage schedule). `spatial=pool` average-pools the larger map to the smaller.
    """

    name = "fitnet"
    needs = frozenset()
    tasks = frozenset({"classification"})
    paper = "Romero et al. 2015, ICLR, arXiv:1412.6550"

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None,
                 connector: str = "conv1x1", spatial: str = "error") -> None:
        super().__init__()
        if connector not in CONNECTORS:
            raise ConfigError(f"distill.connector={connector!r} is not a connector; choose one of "
                              f"{', '.join(CONNECTORS)}")
        if spatial not in SPATIAL:
            raise ConfigError(f"distill.spatial={spatial!r} is not known; choose error (sizes must agree) or pool "
                              f"(average-pool the larger map)")
        self._student_path, self._teacher_path = student_layer, teacher_layer
        self.connector_kind, self.spatial = connector, spatial
        self.connector: nn.Module | None = None

    def bind(self, student, teacher) -> None:
        _no_onnx_teacher(teacher, self.name)
        s = stage_layers(student, self._student_path, "student", "distill.student_layer")
        t = stage_layers(teacher, self._teacher_path, "teacher", "distill.teacher_layer")
        pairs = pair_layers(s, t)
        self._student_path, self._teacher_path = pairs[(len(pairs) - 1) // 2]

    def student_layers(self) -> list[str]:
        return [self._student_path] if self._student_path else []

    def teacher_layers(self) -> list[str]:
        return [self._teacher_path] if self._teacher_path else []

    def _pair(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        s = batch["student_features"][self._student_path]
        t = batch["teacher_features"][self._teacher_path]
        return pool_to_smaller(s, t) if self.spatial == "pool" else (s, t)

    def setup(self, probe, num_samples=None) -> None:
        s, t = self._pair(probe)
        s_shape, t_shape = tuple(s.shape), tuple(t.shape)
        self.connector = build_connector(self.connector_kind, s_shape, t_shape, "distill").to(s.device)
        out = connector_output_shape(self.connector_kind, s_shape, t_shape)
        if out[2:] != t_shape[2:]:
            raise ConfigError(f"fitnet: student layer {self._student_path!r} gives features of shape {s_shape} and "
                              f"teacher layer {self._teacher_path!r} of shape {t_shape}, of different spatial sizes; "
                              f"set distill.spatial=pool (or choose layers of one resolution)")

    def forward(self, batch):
        if self.connector is None:
            raise RuntimeError("FitNet.setup() has not been called")
        s, t = self._pair(batch)
        return {"fitnet": fitnet_loss(self.connector(s), t)}
