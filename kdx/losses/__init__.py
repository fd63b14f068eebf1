"""Distillation losses as plain functions of tensors; they know nothing of Lightning or models.

Logit terms share the signature `f(student_logits, teacher_logits, temperature) -> scalar` and are
looked up by name in `LOGIT_LOSSES` (the names used in `distill.terms`).
"""
from kdx.losses.features import attention_map, attention_transfer_loss, fitnet_loss
from kdx.losses.face import (
    EMBEDDING_LOSSES,
    EmbeddingProjector,
    check_embedding_dims,
    embedding_cosine_loss,
    embedding_mse_loss,
    make_projector,
    relational_kd_loss,
)
from kdx.losses.logits import bce_soft_loss, check_temperature, dkd_loss, kd_loss, logit_mse_loss
from kdx.losses.margin import MARGIN_HEADS, CombinedMarginHead, arcface_head, cosface_head, margin_loss, normsoftmax

LOGIT_LOSSES = {"kd": kd_loss, "mse": logit_mse_loss, "bce": bce_soft_loss}

__all__ = [
    "EMBEDDING_LOSSES", "MARGIN_HEADS", "CombinedMarginHead", "EmbeddingProjector", "arcface_head",
    "check_embedding_dims", "cosface_head", "embedding_cosine_loss", "embedding_mse_loss", "make_projector",
    "margin_loss", "normsoftmax", "relational_kd_loss",
    "LOGIT_LOSSES", "attention_map", "attention_transfer_loss", "bce_soft_loss", "check_temperature",
    "dkd_loss", "fitnet_loss", "kd_loss", "logit_mse_loss",
]
