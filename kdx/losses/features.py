"""Distillation losses on intermediate feature maps (B x C x H x W tensors read by module path).

FitNet (Romero et al. 2015), attention transfer (Zagoruyko & Komodakis 2017), neuron selectivity transfer (Huang &
Wang 2017), VID (Ahn et al. 2019) and ReviewKD's hierarchical context loss (Chen et al. 2021). Student argument first; the teacher is never
differentiated (it carries no graph). Half-precision inputs are computed in float32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kdx.errors import ConfigError


def _full(x: torch.Tensor) -> torch.Tensor:
    """`x` in at least float32 (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_same_shape(s: torch.Tensor, t: torch.Tensor, what: str, fix: str) -> None:
    if s.shape != t.shape:
        raise ConfigError(f"{what}: student features of shape {tuple(s.shape)} and teacher features of shape "
                          f"{tuple(t.shape)} differ; {fix}")


def pool_to_smaller(s_feat: torch.Tensor, t_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller spatial size: the larger one adaptive-average-pooled down, per dimension.

    This is how the AT and VID reference code (RepDistiller, mdistiller) matches stages of different
    resolution; for square maps it is exactly their `adaptive_avg_pool2d(larger, (H_small, H_small))`.
    """
    if s_feat.ndim != 4 or t_feat.ndim != 4:
        raise ConfigError(f"feature maps must be B x C x H x W, got student {tuple(s_feat.shape)} and teacher "
                          f"{tuple(t_feat.shape)}; choose convolutional layers")
    size = (min(s_feat.shape[2], t_feat.shape[2]), min(s_feat.shape[3], t_feat.shape[3]))
    if tuple(s_feat.shape[2:]) != size:
        s_feat = F.adaptive_avg_pool2d(s_feat, size)
    if tuple(t_feat.shape[2:]) != size:
        t_feat = F.adaptive_avg_pool2d(t_feat, size)
    return s_feat, t_feat


def fitnet_loss(s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
    """Romero et al. 2015 hint loss: mean squared error of (already regressed) student and teacher features."""
    _check_same_shape(s_feat, t_feat, "fitnet", "regress the student to the teacher's shape first "
                      "(distill.connector=conv1x1, distill.spatial=pool)")
    return F.mse_loss(_full(s_feat), _full(t_feat))


def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 spatial attention: the channel mean of |f|^p, flattened and L2-normalised (B x HW).

    The reference code raises f to the power p without the absolute value; for p = 2 (its setting) and for
    non-negative (post-ReLU) features the two agree.
    """
    return F.normalize(_full(feature).abs().pow(p).mean(1).flatten(1))  # unit L2 rows (dim=1)


def attention_transfer_loss(s_feat: torch.Tensor, t_feat: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Attention transfer for ONE stage: mean over batch and positions of the squared attention-map difference.

    Channel counts may differ. When the spatial sizes differ, the larger map is adaptive-average-pooled down to
    the smaller one before its attention map is taken (as the RepDistiller / mdistiller reference code does),
    never resized by interpolation. Sum this over stages for the paper's loss (before its weight beta).
    """
    s_feat, t_feat = pool_to_smaller(s_feat, t_feat)
    return (attention_map(s_feat, p) - attention_map(t_feat, p)).pow(2).mean()


def unit_channel_maps(feature: torch.Tensor) -> torch.Tensor:
    """B x C x HW: each channel's activation map flattened over spatial positions and scaled to unit L2 norm.

    Each map is first divided by its largest magnitude (which leaves the unit map unchanged), so maps of values
    as large as 1e30 or as small as 1e-30 are normalised correctly in float32 instead of overflowing to 0 or
    underflowing to a tiny vector; an all-zero map stays zero.
    """
    maps = _full(feature).flatten(2)
    peak = maps.abs().amax(dim=2, keepdim=True)
    maps = maps / peak.clamp_min(torch.finfo(maps.dtype).tiny)
    return F.normalize(maps, dim=2)


def nst_loss(s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
    """Huang & Wang 2017 neuron selectivity transfer for ONE stage: the squared MMD between the student's and the
    teacher's channels, each channel a sample (its L2-normalised activation map over the spatial positions),
    with the polynomial kernel k(x, y) = (x . y)^2, averaged over the batch:

        mean_ij k(t_i, t_j) + mean_ij k(s_i, s_j) - 2 mean_ij k(s_i, t_j)

    (means over all pairs of channels of one sample). Channel counts may differ. When the spatial sizes differ
    the larger map is adaptive-average-pooled down to the smaller one, as the mdistiller reference code does.
    Sum this over stages for the paper's loss (before its weight lambda).
    """
    s_feat, t_feat = pool_to_smaller(s_feat, t_feat)
    s, t = unit_channel_maps(s_feat), unit_channel_maps(t_feat)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    return kernel_mean(t, t) + kernel_mean(s, s) - 2 * kernel_mean(s, t)


def vid_loss(pred_mean: torch.Tensor, pred_var: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
    """Ahn et al. 2019 VID: mean Gaussian negative log-likelihood of the teacher features (constant dropped).

    `pred_mean` is the student's regressed mean (shape of `t_feat`), `pred_var` the positive variance, one per
    channel (C,) or anything broadcastable to `t_feat`: mean of 0.5 * ((mu - t)^2 / var + log var).
    """
    _check_same_shape(pred_mean, t_feat, "vid", "regress and pool the student to the teacher's shape first")
    var = _full(pred_var)
    if var.ndim == 1 and t_feat.ndim > 1:
        if var.shape[0] != t_feat.shape[1]:
            raise ConfigError(f"vid: {var.shape[0]} variances for teacher features with {t_feat.shape[1]} channels")
        var = var.view(1, -1, *([1] * (t_feat.ndim - 2)))
    diff = _full(pred_mean) - _full(t_feat)
    return (0.5 * (diff.pow(2) / var + var.log())).mean()


def hcl_loss(s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """ReviewKD hierarchical context loss, summed over (student, teacher) pairs of equal shape.

    Per pair: the MSE of the full maps plus the MSEs of their 4x4, 2x2 and 1x1 adaptive-average-pooled versions
    (each level used only when smaller than the map's height) weighted 1/2, 1/4, 1/8 in turn, divided by the sum
    of the weights used (1 + 1/2 + ...), as in the ReviewKD reference code.
    """
    if len(s_feats) != len(t_feats) or not len(s_feats):
        raise ConfigError(f"reviewkd: {len(s_feats)} student and {len(t_feats)} teacher feature maps; "
                          f"give one teacher map per student map")
    total = None
    for fs, ft in zip(s_feats, t_feats):
        _check_same_shape(fs, ft, "reviewkd", "the fusion modules must produce the teacher's shape")
        fs, ft = _full(fs), _full(ft)
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if fs.ndim < 4 or level >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weights += weight
        total = loss / weights if total is None else total + loss / weights
    return total
