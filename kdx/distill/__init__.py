"""Distillation methods: one file each under kdx/distill/methods, found by name in one registry.

    from kdx.distill import build_distiller
    dkd = build_distiller("dkd", {"temperature": 4.0, "beta": 8.0})
    losses = dkd({"student_logits": s, "teacher_logits": t, "labels": y})   # {"dkd": tensor}
"""
from kdx.distill.base import (
    Distiller,
    DistillBatch,
    available_distillers,
    build_distiller,
    distiller_class,
    distiller_parameters,
    register_distiller,
)
from kdx.distill.mix import HOST_KEYS, DistillerSet, build_distiller_set, require_sample_indices, split_distill_config, weigh_losses
from kdx.distill.taps import LayerTaps, resolve_layer

__all__ = [
    "HOST_KEYS", "DistillBatch", "Distiller", "DistillerSet", "LayerTaps", "available_distillers",
    "build_distiller", "build_distiller_set", "require_sample_indices", "distiller_class", "distiller_parameters", "register_distiller", "weigh_losses",
    "resolve_layer", "split_distill_config",
]

from kdx.distill import methods  # noqa: E402,F401  (each method file registers itself)
