"""AdaDistill (Boutros et al., ECCV 2024): a margin-penalty softmax whose class centres come from the teacher.

The student's embeddings are classified against class centres built from the teacher's normalised embeddings
instead of learned weights. Before each step the centre of a sample's identity y moves towards that sample's
teacher embedding t (unit length) as an exponential moving average with a per-sample weight a:

    c_y <- a * c_y + (1 - a) * t,    a = clamp(cos(s, t) * clamp(cos(c_y, t), 1e-6, 1), 1e-6, 1)

While the student is far from the teacher (small cos(s, t)) the centre is mostly the sample's own teacher
embedding (sample-to-sample knowledge); as the student catches up, a grows and the centre keeps more of its
history (sample-to-centre knowledge). The cos(c_y, t) factor lowers a for samples far from their centre
(hard samples). The loss is then the ArcFace (or CosFace) cross-entropy of the student against the updated
centres. Centres are never trained by gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdx.errors import ConfigError

MARGIN_TYPES = ("arcface", "cosface")
_CLAMP = 1e-6  # the authors' bounds on cos(c_y, t) and on the EMA weight
_ACOS_EPS = 1e-7  # keeps acos' gradient finite at cos = +-1


def check_margin(margin_type: str, margin: float, scale: float) -> tuple[str, float, float]:
    """(margin_type, margin, scale) when valid, else a ConfigError naming the key."""
    if margin_type not in MARGIN_TYPES:
        raise ConfigError(f"distill.margin_type must be one of {', '.join(MARGIN_TYPES)}, got {margin_type!r}")
    for key, value, ok in (("margin", margin, lambda v: 0 <= v < math.pi), ("scale", scale, lambda v: v > 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            bound = "in [0, pi)" if key == "margin" else "> 0"
            raise ConfigError(f"distill.{key} must be a number {bound}, got {value!r}")
    return margin_type, float(margin), float(scale)


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor,
                  centres: torch.Tensor) -> None:
    dim = centres.shape[1]
    if student.ndim != 2 or student.shape[1] != dim or (teacher is not None and teacher.shape != student.shape):
        raise ConfigError(f"AdaDistill needs student and teacher embeddings of the centres' size {dim}, got "
                          f"{tuple(student.shape)}" + ("" if teacher is None else f" and {tuple(teacher.shape)}") +
                          "; set distill.projection=true when the embedding sizes differ")
    if labels.shape != (student.shape[0],):
        raise ValueError(f"labels must be a vector of {student.shape[0]} identities, got shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.max()) >= centres.shape[0]:
        raise ConfigError(f"label {int(labels.max())} is outside the {centres.shape[0]} class centres of AdaDistill; "
                          "the centres are sized by the number of training identities")


def adadistill_weights(student: torch.Tensor, teacher: torch.Tensor, label_centres: torch.Tensor) -> torch.Tensor:
    """Per-sample EMA weight a = clamp(cos(s, t) * max(cos(c_y, t), 1e-6), 1e-6, 1) (B,), no gradient (the
    authors also cap cos(c_y, t) at 1, which only float rounding could exceed)."""
    with torch.no_grad():  # F.normalize: unit L2 rows (its defaults p=2, dim=1)
        s, t, c = F.normalize(student.float()), F.normalize(teacher.float()), F.normalize(label_centres.float())
        agreement = (s * t).sum(1)
        hardness = (c * t).sum(1).clamp(min=_CLAMP)  # the product's clamp below bounds both from above
        return (agreement * hardness).clamp(_CLAMP, 1.0)


def adadistill_update(centres: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """The centres (K x D) after one AdaDistill step: c_y <- a c_y + (1 - a) t/|t| for each sample's identity y.

    Every sample's update starts from the centres as they were before the step; an identity seen several times
    in the batch keeps the update of its last sample (what the authors' indexed assignment does on the CPU).
    Rows labelled -1 are skipped. Returns a new tensor; nothing carries a gradient.
    """
    _check_inputs(student, teacher, labels, centres)
    with torch.no_grad():
        labels = labels.long()
        keep = (labels >= 0).nonzero().view(-1)
        new = centres.detach().clone()
        if keep.numel() == 0:
            return new
        last = labels.new_full((centres.shape[0],), -1)
        last.scatter_reduce_(0, labels[keep], keep, reduce="amax")
        rows = last[last >= 0]  # one sample per identity present in the batch
        ids = labels[rows]
        old = centres[ids].float()
        t = F.normalize(teacher[rows].float())
        a = adadistill_weights(student[rows], teacher[rows], old).unsqueeze(1)
        new[ids] = a * old + (1.0 - a) * t  # cast to the centres' dtype by the assignment
        return new


def centre_margin_logits(student: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, margin: float = 0.45,
                         scale: float = 64.0, margin_type: str = "arcface") -> torch.Tensor:
    """B x K margin logits of the student against fixed centres: s * cos(theta_y + m) (ArcFace) or s * (cos - m).

    cos(theta_j) is the cosine of the student embedding and centre j; only the target identity gets the margin
    (rows labelled -1 get none). ArcFace here has no fallback past theta_y + m > pi, as in the authors' code.
    """
    margin_type, margin, scale = check_margin(margin_type, margin, scale)
    _check_inputs(student, None, labels, centres)
    cos = F.linear(F.normalize(student.float()), F.normalize(centres.float()))  # unit rows: cosines
    rows = (labels >= 0).nonzero().view(-1)
    cols = labels.long()[rows]
    target = cos[rows, cols]
    if margin_type == "arcface":
        target = torch.cos(torch.acos(target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS)) + margin)
    else:
        target = target - margin
    logits = cos.clone()
    logits[rows, cols] = target
    return logits * scale


def centre_margin_loss(student: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, margin: float = 0.45,
                       scale: float = 64.0, margin_type: str = "arcface") -> torch.Tensor:
    """Cross-entropy (batch mean, rows labelled -1 ignored) of `centre_margin_logits`."""
    logits = centre_margin_logits(student, centres, labels, margin, scale, margin_type)
    return F.cross_entropy(logits, labels.long(), ignore_index=-1)


def adadistill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor,
                    margin: float = 0.45, scale: float = 64.0, margin_type: str = "arcface") -> torch.Tensor:
    """One AdaDistill step's loss: the centres updated with this batch (`adadistill_update`), then the margin loss."""
    updated = adadistill_update(centres, student, teacher, labels)
    return centre_margin_loss(student, updated, labels, margin, scale, margin_type)
