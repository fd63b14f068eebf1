"""Relation-based distillation losses: match how samples of a batch relate, not the features themselves.

RKD (Park et al. 2019) matches pairwise distances and triplet angles, PKT (Passalis & Tefas 2018) the
conditional probabilities of a cosine kernel, SP (Tung & Mori 2019) the row-normalised Gram matrices. Student
and teacher may have different feature sizes; only the batch sizes must agree. Half-precision inputs are
computed in float32, with autocast off.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from kdx.errors import ConfigError


def _full_precision(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run `fn` with autocast off (its distance and Gram products lose too much in 16 bits)."""
    @functools.wraps(fn)
    def wrapper(student: torch.Tensor, teacher: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        device = student.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device_type=device, enabled=False):
                return fn(student, teacher, *args, **kwargs)
        return fn(student, teacher, *args, **kwargs)
    return wrapper


def _flat(x: torch.Tensor) -> torch.Tensor:
    """`x` as B x D, in float32 unless it is already float32/float64."""
    x = x.reshape(x.shape[0], -1)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _pair(student: torch.Tensor, teacher: torch.Tensor, what: str,
          min_batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors flattened to B x D, or a ConfigError when their batch sizes differ or are below `min_batch`."""
    if student.ndim < 2 or teacher.ndim < 2 or student.shape[0] != teacher.shape[0]:
        raise ConfigError(f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be batches "
                          f"of the same size (B x ...); pass the two networks' outputs for the same images")
    if student.shape[0] < min_batch:
        raise ConfigError(f"{what} relates the samples of a batch and needs at least {min_batch} of them, got a "
                          f"batch of {student.shape[0]}; raise data.batch_size")
    s, t = _flat(student), _flat(teacher)
    dtype = torch.promote_types(s.dtype, t.dtype)
    return s.to(dtype), t.to(dtype)


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix (squared distances clamped at `eps` before the root, diagonal 0), as RKD's code."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """Pairwise distances divided by the mean of the positive ones (RKD's scale-free distance potential)."""
    d = _pairwise_distances(e)
    return d / d[d > 0].mean()


def _triplet_cosines(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex i between e_j - e_i and e_k - e_i for every (i, j, k), flattened (B^3 values;
    degenerate triplets, j = i or k = i, give 0)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # [i, j] = unit(e_j - e_i), L2
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


@_full_precision
def rkd_distance_loss(s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """RKD-D (unweighted): Huber loss (smooth L1, mean over B x B) between mean-normalised distance matrices."""
    s, t = _pair(s_emb, t_emb, "rkd", min_batch=2)
    with torch.no_grad():
        t_d = _normalised_distances(t.detach())
    return F.smooth_l1_loss(_normalised_distances(s), t_d)


@_full_precision
def rkd_angle_loss(s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """RKD-A (unweighted): Huber loss (smooth L1, mean over all B^3 triplets) between triplet angle cosines."""
    s, t = _pair(s_emb, t_emb, "rkd", min_batch=2)
    with torch.no_grad():
        t_a = _triplet_cosines(t.detach())
    return F.smooth_l1_loss(_triplet_cosines(s), t_a)


def rkd_loss(s_emb: torch.Tensor, t_emb: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Park et al. 2019 relational KD: distance_weight * RKD-D + angle_weight * RKD-A (teacher not differentiated)."""
    return distance_weight * rkd_distance_loss(s_emb, t_emb) + angle_weight * rkd_angle_loss(s_emb, t_emb)


def _cosine_conditionals(x: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's P(j | i): rows of the cosine kernel (cos + 1) / 2, each divided by its sum (diagonal included)."""
    x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)  # same value; finite gradient at 0
    x = x.masked_fill(torch.isnan(x), 0.0)  # a zero row with eps = 0
    k = x @ x.t() + 1.0  # the kernel's / 2 cancels in the row normalisation
    return k / k.sum(1, keepdim=True)


@_full_precision
def pkt_loss(s_emb: torch.Tensor, t_emb: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas 2018 PKT: mean over B x B of q * log((q + eps) / (p + eps)), q teacher's and p student's
    cosine-kernel conditional probabilities (KL(q || p) per row, averaged over all entries as the reference)."""
    s, t = _pair(s_emb, t_emb, "pkt")
    p, q = _cosine_conditionals(s, eps), _cosine_conditionals(t, eps)
    return (q * torch.log((q + eps) / (p + eps))).mean()


def _row_normalised_gram(x: torch.Tensor) -> torch.Tensor:
    """B x B Gram matrix of the flattened features, each row L2-normalised."""
    return F.normalize(x @ x.t())  # L2 rows (F.normalize's defaults)


@_full_precision
def sp_loss(s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
    """Tung & Mori 2019 similarity-preserving loss: ||G_t - G_s||_F^2 / B^2 with row-normalised Gram matrices."""
    s, t = _pair(s_feat, t_feat, "sp")
    b = s.shape[0]
    return (_row_normalised_gram(t) - _row_normalised_gram(s)).pow(2).sum() / (b * b)
