"""Ahn et al. 2019, "Variational Information Distillation for Knowledge Transfer": Gaussian likelihood of teacher
features under a mean regressed from the student and a learned per-channel variance."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdx.distill.base import Distiller, register_distiller
from kdx.distill.methods._stage_pairs import PairedStages
from kdx.errors import ConfigError
from kdx.losses.features import pool_to_smaller, vid_loss


def _number(value, key: str, low: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > low):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return float(value)


@register_distiller
class VID(PairedStages, Distiller):
    """VID summed over every paired stage: per pair a regressor conv1x1-ReLU-conv1x1-ReLU-conv1x1 (no biases,
    hidden width `mid_ratio` x the teacher's channels) and variances softplus(alpha_c) + eps, alpha initialised
    so that every variance starts at `init_pred_var` (as the authors' code). Larger maps are pooled down."""

    name = "vid"
    needs = frozenset()
    tasks = frozenset({"classification"})
    paper = "Ahn et al. 2019, CVPR, arXiv:1904.05835"

    def __init__(self, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None,
                 init_pred_var: float = 5.0, eps: float = 1e-5, mid_ratio: float = 1.0) -> None:
        super().__init__()
        self.eps = _number(eps, "distill.eps", 0.0, "a number > 0")
        self.init_pred_var = _number(init_pred_var, "distill.init_pred_var", self.eps,
                                     f"a variance > distill.eps ({self.eps})")
        self.mid_ratio = _number(mid_ratio, "distill.mid_ratio", 0.0, "a number > 0 (the reference uses 1)")
        self._given = (student_layers, teacher_layers)
        self._pairs: list[tuple[str, str]] = []
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def setup(self, probe, num_samples=None) -> None:
        regressors, scales = nn.ModuleList(), nn.ParameterList()
        start = math.log(math.expm1(self.init_pred_var - self.eps))  # softplus(start) + eps = init_pred_var
        for sp, tp in self._pairs:
            s, t = pool_to_smaller(probe["student_features"][sp], probe["teacher_features"][tp])
            s_c, t_c = s.shape[1], t.shape[1]
            mid = max(1, round(self.mid_ratio * t_c))
            regressors.append(nn.Sequential(
                nn.Conv2d(s_c, mid, 1, bias=False), nn.ReLU(), nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
                nn.Conv2d(mid, t_c, 1, bias=False)).to(s.device))
            scales.append(nn.Parameter(torch.full((t_c,), start, device=s.device)))
        self.regressors, self.log_scales = regressors, scales

    def forward(self, batch):
        if len(self.regressors) != len(self._pairs) or not self._pairs:
            raise RuntimeError("VID.setup() has not been called")
        total = None
        for (sp, tp), regressor, log_scale in zip(self._pairs, self.regressors, self.log_scales):
            s, t = pool_to_smaller(batch["student_features"][sp], batch["teacher_features"][tp])
            loss = vid_loss(regressor(s), F.softplus(log_scale) + self.eps, t)
            total = loss if total is None else total + loss
        return {"vid": total}
