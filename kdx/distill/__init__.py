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
from kdx.distill.source import CachePlan, TeacherSource, classifier_source, face_source, plan_teacher_cache

__all__ = [
    "HOST_KEYS", "CachePlan", "DistillBatch", "Distiller", "DistillerSet", "LayerTaps", "TeacherSource",
    "available_distillers", "build_distiller", "build_distiller_set", "require_sample_indices", "classifier_source",
    "distiller_class", "distiller_parameters", "face_source", "plan_teacher_cache", "register_distiller",
    "weigh_losses", "resolve_layer", "split_distill_config",
]

from kdx.distill import methods  # noqa: E402,F401  (each method file registers itself)
