"""LightningModules: supervised/transfer classifier, distillation (mixin + module), linear probe, face training
and face distillation."""
from kdx.lit.classifier import ClassifierModule
from kdx.lit.distill import DistillationMixin, DistillationModule, check_alpha
from kdx.lit.face import FaceModule
from kdx.lit.face_distill import FaceDistillationModule
from kdx.lit.probe import LinearProbeModule

__all__ = ["ClassifierModule", "DistillationMixin", "DistillationModule", "FaceDistillationModule",
           "FaceModule", "LinearProbeModule", "check_alpha"]
