"""Distillation losses on logits. Pure functions of tensors; each returns a scalar (batch mean).

Logits are B x C (or B x C x ... for dense predictions where a loss allows it): the class dimension is 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdx.errors import ConfigError


def check_temperature(temperature: float) -> float:
    """Return `temperature` if it is a finite positive number, else raise a ConfigError naming the key."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ConfigError(f"distill.temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015 soft-label loss: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, batch mean.

    The T^2 factor keeps the gradient scale independent of the temperature.
    """
    T = check_temperature(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * (T * T)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of mixed images (mixup/cutmix, Zhang et al. 2018; Yun et al. 2019): per sample
    lam * CE(labels) + (1 - lam) * CE(partner_labels), batch mean.

    A sample whose own label or (when mixed, lam < 1) partner's label is unlabeled (-1) has no full target and
    is left out; with none left the loss is 0 (keeping the graph).
    """
    lam = lam.to(logits.device, torch.float32)
    usable = (labels >= 0) & ((partner_labels >= 0) | (lam >= 1))
    if not bool(usable.any()):
        return logits.sum() * 0.0
    logits, lam = logits[usable].float(), lam[usable]
    own = F.cross_entropy(logits, labels[usable], reduction="none", label_smoothing=label_smoothing)
    other = F.cross_entropy(logits, partner_labels[usable].clamp_min(0), reduction="none",
                            label_smoothing=label_smoothing)
    return (lam * own + (1 - lam) * other).mean()


def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits, mean over batch and classes (Ba & Caruana 2014; no temperature)."""
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

    TCKD is the KL divergence between the binary (target, all others) probabilities of teacher and student;
    NCKD the KL divergence between their distributions over the non-target classes alone. Both bins are
    computed in log space (log p_target = z_y - logsumexp z), so TCKD and its gradient stay exact however
    far the target logit is from the others.
    """
    T = check_temperature(temperature)
    s, t = student_logits.float() / T, teacher_logits.float() / T
    if s.shape != t.shape or s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"dkd_loss needs student and teacher logits of one shape B x C with C >= 2, "
                         f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    gt = F.one_hot(target.long(), s.shape[1]).bool()

    def bins(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log binary probabilities [target, rest], log-softmax over the non-target classes)."""
        log_all = torch.logsumexp(z, dim=1, keepdim=True)
        rest = z.masked_fill(gt, -math.inf)
        log_rest = torch.logsumexp(rest, dim=1, keepdim=True)
        log_target = z.gather(1, target.long().unsqueeze(1))
        return torch.cat([log_target, log_rest], 1) - log_all, rest - log_rest

    bin_s, part_s = bins(s)
    bin_t, part_t = bins(t)
    tckd = (bin_t.exp() * (bin_t - bin_s)).sum(1).mean()
    p_t = part_t.exp()  # exactly 0 at the target class, whose log-probabilities are -inf: zero them first
    nckd = (p_t * (part_t.masked_fill(gt, 0.0) - part_s.masked_fill(gt, 0.0))).sum(1).mean()
    return (alpha * tckd + beta * nckd) * T * T


def logit_standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Sun et al. 2024: z-score each row of logits, (z - mean) / (eps + std), std with Bessel's correction."""
    z = logits.float()
    return (z - z.mean(1, keepdim=True)) / (eps + z.std(1, keepdim=True))


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al. 2022): T^2 * (beta * inter-class + gamma * intra-class) relation loss.

    With p = softmax(z / T): inter = 1 - mean over samples of the Pearson correlation of student and teacher
    rows; intra = the same over classes (columns), so the ranking within a class across the batch is kept.
    """
    T = check_temperature(temperature)
    p_s = F.softmax(student_logits.float() / T, dim=1)
    p_t = F.softmax(teacher_logits.float() / T, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return T * T * (beta * inter + gamma * intra)
