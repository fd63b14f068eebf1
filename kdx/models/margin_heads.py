"""Combined-margin softmax heads for face recognition (trainable class weights): ArcFace, CosFace, normalised softmax.

With unit-length embeddings x and class weights w_j, cos(theta_j) = <x, w_j>. The target class y
gets the logit s * (cos(m1 * theta_y + m2) - m3), every other class s * cos(theta_j)
(SphereFace m1, ArcFace m2, CosFace m3). The loss is the cross-entropy of these logits
(kdx.losses.margin_loss). When m1 * theta_y + m2 would pass pi, cos(.) would stop decreasing in theta; there the
target logit falls back to s * (cos(theta_y) - m3 - m2 * sin(m2)), as insightface does
(`easy_margin=True` instead applies the margin only where cos(theta_y) > 0).

Checkpoints store a head as its `task.margin` settings (the kdx section's `margin`) and its weight tensor, never
this module's path, so checkpoints written while the heads lived in kdx.losses.margin load unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdx.errors import ConfigError

_EPS = 1e-7


class CombinedMarginHead(nn.Module):
    """Class-weight matrix + combined margin; `forward(embeddings, labels)` returns B x num_classes logits."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0, easy_margin: bool = False):
        """`s` scale, `m1` multiplicative angular, `m2` additive angular, `m3` additive cosine margin."""
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ConfigError(f"margin head needs num_classes >= 1 and embedding_size >= 1, got {num_classes}, {embedding_size}")
        if s <= 0:
            raise ConfigError(f"margin.s (logit scale) must be > 0, got {s}")
        if m1 < 1 or m2 < 0 or m3 < 0 or m2 >= math.pi:
            raise ConfigError(f"margins must satisfy m1 >= 1, 0 <= m2 < pi, m3 >= 0; got m1={m1}, m2={m2}, m3={m3}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.easy_margin = easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        # theta above which m1*theta + m2 > pi, as a cosine, and the fallback penalty
        self.cos_limit = math.cos((math.pi - self.m2) / self.m1)
        self.fallback = self.m2 * math.sin(self.m2)

    def extra_repr(self) -> str:
        """Sizes and margins, shown by print(module)."""
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, "
                f"m1={self.m1}, m2={self.m2}, m3={self.m3}")

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(theta): B x num_classes cosines between normalised embeddings and class weights."""
        # F.normalize: unit L2 rows (its defaults p=2, dim=1) of the embeddings and of the class weights
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))

    def margin_target(self, cos: torch.Tensor) -> torch.Tensor:
        """cos(m1*theta + m2) - m3 for target cosines `cos`, with the threshold/easy-margin fallback."""
        c = cos.clamp(-1 + _EPS, 1 - _EPS)
        if self.m1 == 1.0:  # cos(theta + m2) by the angle-sum rule (exactly c when m2 = 0)
            sin = torch.sqrt(1.0 - c * c)
            target = c * math.cos(self.m2) - sin * math.sin(self.m2)
        else:
            target = torch.cos(self.m1 * torch.acos(c) + self.m2)
        # past the limit (or, with easy_margin, at theta >= 90 degrees) fall back; with no angular margin
        # (m1 = 1, m2 = 0) both fallbacks return c itself
        if self.easy_margin:
            target = torch.where(c > 0, target, c)
        else:
            target = torch.where(c > self.cos_limit, target, c - self.fallback)
        return target - self.m3

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Margin logits for training; with labels None the plain scaled cosines (for evaluation)."""
        cos = self.cosine(embeddings)
        if labels is None:
            return cos * self.s
        labels = labels.long().view(-1)
        rows = (labels >= 0).nonzero().view(-1)  # label -1 = no margin (ignored row)
        if labels.numel() and labels.max() >= self.num_classes:
            raise ConfigError(f"label {int(labels.max())} is outside the margin head's {self.num_classes} classes; "
                              "set data num_classes to match the dataset")
        target_cos = cos[rows, labels[rows]]
        logits = cos.clone()
        logits[rows, labels[rows]] = self.margin_target(target_cos)
        return logits * self.s

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the margin logits (batch mean; rows labelled -1 ignored): kdx.losses.margin_loss, written
        out here because kdx.models does not import its sibling kdx.losses."""
        return F.cross_entropy(self(embeddings, labels), labels.long(), ignore_index=-1)


# preset -> (m1, m2, m3): normalised softmax, ArcFace additive angular, CosFace additive cosine margin
MARGIN_PRESETS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "normsoftmax": (1.0, 0.0, 0.0)}


def build_margin_head(embedding_size: int, num_classes: int, kind: str = "arcface", s: float = 64.0,
                      m1: float | None = None, m2: float | None = None, m3: float | None = None,
                      easy_margin: bool = False) -> CombinedMarginHead:
    """A CombinedMarginHead from a `task.margin` config: preset `kind`, scale `s`, optional m1/m2/m3 overrides."""
    if kind not in MARGIN_PRESETS:
        raise ConfigError(f"task.margin.kind must be one of {', '.join(MARGIN_PRESETS)}, got {kind!r}")
    p1, p2, p3 = MARGIN_PRESETS[kind]
    return CombinedMarginHead(embedding_size, num_classes, s=float(s), m1=float(p1 if m1 is None else m1),
                              m2=float(p2 if m2 is None else m2), m3=float(p3 if m3 is None else m3),
                              easy_margin=bool(easy_margin))


def arcface_head(embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> CombinedMarginHead:
    """ArcFace (additive angular margin): m1=1, m2=m (0.5), m3=0."""
    return build_margin_head(embedding_size, num_classes, "arcface", s=s, m2=m)


def cosface_head(embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4) -> CombinedMarginHead:
    """CosFace (additive cosine margin): m1=1, m2=0, m3=m (0.4)."""
    return build_margin_head(embedding_size, num_classes, "cosface", s=s, m3=m)


def normsoftmax(embedding_size: int, num_classes: int, s: float = 64.0) -> CombinedMarginHead:
    """Normalised softmax (NormFace): scaled cosine logits, no margin."""
    return build_margin_head(embedding_size, num_classes, "normsoftmax", s=s)
