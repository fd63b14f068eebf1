"""Which student layer is compared with which teacher layer, when a method's config leaves it to the networks."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from kdx.errors import ConfigError
from kdx.models.contract import feature_stages


def stage_layers(model: nn.Module, given: Sequence[str] | str | None, role: str, key: str) -> list[str]:
    """`given` as a list, or the network's stage outputs (kdx.models.feature_stages) when `given` is empty."""
    if given:
        return [given] if isinstance(given, str) else [str(g) for g in given]
    stages = feature_stages(model)
    if not stages:
        raise ConfigError(f"{type(model).__name__} declares no feature stages; set {key}=[PATH, ...] to the {role} "
                          f"layers to read (module paths, e.g. layer2 or features.6)")
    return stages


def pair_layers(student: Sequence[str], teacher: Sequence[str]) -> list[tuple[str, str]]:
    """Student and teacher layers matched from the deepest down (lists of unequal length keep their deep ends)."""
    n = min(len(student), len(teacher))
    return list(zip(student[len(student) - n:], teacher[len(teacher) - n:]))
