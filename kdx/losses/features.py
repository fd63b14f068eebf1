"""Distillation losses on intermediate feature maps (taken by module path, see kdx.models.capture_outputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 spatial attention: L2-normalised channel mean of squared activations."""
    return F.normalize(feature.float().pow(2).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two attention maps (spatial sizes must agree)."""
    if student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        student_feature = F.interpolate(student_feature, size=teacher_feature.shape[-2:], mode="bilinear",
                                        align_corners=False)
    return (attention_map(student_feature) - attention_map(teacher_feature)).pow(2).mean()


def fitnet_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Romero et al. 2015 hint loss: MSE between (already regressed) student and teacher features."""
    return F.mse_loss(student_feature.float(), teacher_feature.float())
