"""Distillation losses on logits. Pure functions of tensors; each returns a scalar (batch mean)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdx.errors import ConfigError


def check_temperature(temperature: float) -> float:
    """Return `temperature` if it is a positive number, else raise a ConfigError naming the key."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ConfigError(f"distill.temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015 soft-label loss: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, batch mean.

    The T^2 factor keeps the gradient scale independent of the temperature.
    """
    T = check_temperature(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl.mean() * (T * T)


def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error between raw logits, mean over batch and classes (Ba & Caruana 2014).

    The temperature is accepted for a uniform signature and ignored: logit matching has none.
    """
    return F.mse_loss(student_logits.float(), teacher_logits.float())


def bce_soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logistic soft targets: mean over batch and classes of BCE-with-logits(s/T, sigmoid(t/T)).

    Each class is an independent yes/no question whose soft answer is the teacher's sigmoid.
    """
    T = check_temperature(temperature)
    targets = torch.sigmoid(teacher_logits.float() / T)
    return F.binary_cross_entropy_with_logits(student_logits.float() / T, targets)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, each T^2-scaled and batch-averaged.

    TCKD compares the binary (target, rest) probabilities; NCKD compares the distributions over the
    non-target classes, with the target class masked out.
    """
    T = check_temperature(temperature)
    s, t = student_logits.float() / T, teacher_logits.float() / T
    gt = F.one_hot(target, s.shape[-1]).bool()
    p_s, p_t = F.softmax(s, -1), F.softmax(t, -1)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], -1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], -1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean()
    masked_s = F.log_softmax(s.masked_fill(gt, -1e9), -1)
    masked_t = F.log_softmax(t.masked_fill(gt, -1e9), -1)
    nckd = (masked_t.exp() * (masked_t - masked_s)).masked_fill(gt, 0).sum(-1).mean()
    return (alpha * tckd + beta * nckd) * T * T
