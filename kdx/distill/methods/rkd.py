"""Park et al. 2019, "Relational Knowledge Distillation": match in-batch distances and triplet angles."""
from __future__ import annotations

import math

from kdx.distill.base import Distiller, register_distiller
from kdx.errors import ConfigError
from kdx.losses.relations import rkd_angle_loss, rkd_distance_loss


def _weight(value: float, key: str) -> float:
    """`value` as a float if it is a finite number >= 0, else a ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
    return float(value)


@register_distiller
class RKD(Distiller):
    """RKD-D and RKD-A on the embeddings (features entering the classifier, or face embeddings); sizes may differ.

    Returns the two weighted parts, `rkd_distance` (distance_weight * RKD-D) and `rkd_angle` (angle_weight * RKD-A).
    """

    name = "rkd"
    needs = frozenset({"embedding"})
    tasks = frozenset({"classification", "face"})
    paper = "Park et al. 2019, CVPR, arXiv:1904.05068"

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = _weight(distance_weight, "distill.distance_weight")
        self.angle_weight = _weight(angle_weight, "distill.angle_weight")

    def forward(self, batch):
        s, t = batch["student_embedding"], batch["teacher_embedding"]
        return {"rkd_distance": self.distance_weight * rkd_distance_loss(s, t),
                "rkd_angle": self.angle_weight * rkd_angle_loss(s, t)}
