"""Shared pieces of the logit methods (not a method: files starting with _ hold helpers)."""
from __future__ import annotations

import torch

from kdx.losses.logits import logit_standardize


def maybe_standardize(logits: torch.Tensor, enabled: bool) -> torch.Tensor:
    """z-scored logits (Sun et al. 2024) when `enabled`, else the logits unchanged."""
    return logit_standardize(logits) if enabled else logits


def warmup_factor(epoch: int | None, warmup_epochs: float) -> float:
    """Linear ramp of a loss over the first `warmup_epochs` epochs (epoch counted from 0): min((e+1)/W, 1)."""
    if not warmup_epochs or epoch is None:
        return 1.0
    return min((int(epoch) + 1) / float(warmup_epochs), 1.0)
