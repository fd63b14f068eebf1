"""Distillation losses as plain functions of tensors, student first; they know nothing of Lightning or models.

The methods that use them (and are found by name) live in kdx.distill; the trainable face margin heads whose
logits `margin_loss` takes live in kdx.models.margin_heads.
"""
from kdx.losses.contrastive import ContrastMemory, crd_loss, crd_nce_loss
from kdx.losses.features import attention_map, attention_transfer_loss, fitnet_loss, hcl_loss, nst_loss, vid_loss
from kdx.losses.face import (
    EMBEDDING_LOSSES,
    EmbeddingProjector,
    check_embedding_dims,
    embedding_cosine_loss,
    embedding_mse_loss,
    make_projector,
    relational_kd_loss,
)
from kdx.losses.logits import (bce_soft_loss, check_temperature, dist_loss, dkd_loss, kd_loss, logit_mse_loss,
                               logit_standardize, mixed_cross_entropy)
from kdx.losses.relations import pkt_loss, rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss
from kdx.losses.margin import margin_loss

__all__ = [
    "EMBEDDING_LOSSES", "EmbeddingProjector", "check_embedding_dims", "embedding_cosine_loss", "embedding_mse_loss",
    "make_projector", "margin_loss", "relational_kd_loss",
    "attention_map", "attention_transfer_loss", "bce_soft_loss", "check_temperature",
    "dist_loss", "dkd_loss", "fitnet_loss", "kd_loss", "logit_mse_loss", "logit_standardize",
    "mixed_cross_entropy", "nst_loss",
    "ContrastMemory", "crd_loss", "crd_nce_loss", "hcl_loss", "pkt_loss", "rkd_angle_loss", "rkd_distance_loss",
    "rkd_loss", "sp_loss", "vid_loss",
]
