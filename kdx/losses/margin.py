"""The margin-softmax loss: cross-entropy of margin logits (those of a kdx.models.margin_heads head).

Rows labelled -1 (images without an identity) are ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_loss(margin_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of margin logits; rows labelled -1 are ignored."""
    return F.cross_entropy(margin_logits, labels.long(), ignore_index=-1)
