"""LightningModules: supervised/transfer classifier, distillation (mixin + module), linear probe, face training."""
from kdx.lit.classifier import ClassifierModule
from kdx.lit.distill import DistillationMixin, DistillationModule, DistillTerm, check_alpha, logit_terms
from kdx.lit.face import FaceDistillationModule, FaceModule, FaceTeacher
from kdx.lit.probe import LinearProbeModule

__all__ = ["ClassifierModule", "DistillTerm", "DistillationMixin", "DistillationModule", "FaceDistillationModule",
           "FaceModule", "FaceTeacher", "LinearProbeModule",
           "check_alpha", "logit_terms"]
