"""LightningModules: supervised/transfer classifier, distillation (mixin + module), linear probe, face training."""
from kdx.lit.classifier import ClassifierModule
from kdx.lit.distill import DistillationMixin, DistillationModule, check_alpha, split_batch
from kdx.lit.face import FaceDistillationModule, FaceModule, FaceTeacher
from kdx.lit.probe import LinearProbeModule

__all__ = ["ClassifierModule", "DistillationMixin", "DistillationModule", "FaceDistillationModule",
           "FaceModule", "FaceTeacher", "LinearProbeModule",
           "check_alpha", "split_batch"]
