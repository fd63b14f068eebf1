"""Contrastive representation distillation (Tian et al. 2020, CRD): embedding heads, memory banks, NCE loss.

The student's and teacher's embeddings are projected (linear + L2 norm) into a common space. Two memory
banks hold one slowly updated projected embedding per training sample, for the student and for the teacher.
Each sample is scored against its own entry (the positive) and K other entries (negatives) of the OTHER
network's bank; a noise-contrastive estimation (NCE) loss tells the positive from the noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdx.errors import ConfigError


def crd_nce_loss(scores: torch.Tensor, num_samples: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (its Eq. 18) on B x (K+1) normalised exp-scores P whose column 0 is the positive.

    With noise distribution Pn = 1 / num_samples and m = K: the sum over the batch of
    -log(P_0 / (P_0 + m Pn + eps)) - sum_k log(m Pn / (P_k + m Pn + eps)), divided by B.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ConfigError(f"crd_nce_loss needs B x (K+1) scores with K >= 1 negatives, got shape {tuple(scores.shape)}")
    if num_samples < 1:
        raise ConfigError(f"crd_nce_loss needs num_samples >= 1 (the training-set size), got {num_samples}")
    m = scores.shape[1] - 1
    m_pn = m / float(num_samples)
    positive = scores[:, 0]
    negatives = scores[:, 1:]
    log_d1 = torch.log(positive / (positive + m_pn + eps))
    log_d0 = torch.log(m_pn / (negatives + m_pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def crd_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """CRD's objective: the NCE loss of the student-anchored scores plus that of the teacher-anchored ones."""
    return crd_nce_loss(student_scores, num_samples) + crd_nce_loss(teacher_scores, num_samples)


class EmbedHead(nn.Module):
    """CRD's projection head: a linear map of the flattened features, then L2 normalisation."""

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm projection (computed in float32) of B x ... features."""
        x = self.linear(x.reshape(x.shape[0], -1))
        return F.normalize(x.float())  # L2 rows (F.normalize's defaults p=2, dim=1)


class ContrastMemory(nn.Module):
    """Two memory banks (student and teacher, `num_samples` x `feat_dim` buffers) and CRD's scoring.

    Banks start uniform in [-s, s] with s = 1 / sqrt(feat_dim / 3) (as the reference). Negatives are drawn
    uniformly over all training samples with replacement (the reference's alias sampler with uniform
    weights; a drawn negative may be the positive itself), not from other classes (the reference's 'exact'
    dataset mode): pass `contrast_idx` to choose them yourself. `generator` (a torch.Generator) seeds the
    draws; without it the global RNG of the banks' device is used. The normalisation constants Z are fixed
    from the first batch, Z = mean(exp-scores) * num_samples, and kept in buffers (checkpointed).
    """

    def __init__(self, feat_dim: int, num_samples: int, nce_k: int, temperature: float = 0.07,
                 momentum: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_samples < 2:
            raise ConfigError(f"CRD needs a training set of at least 2 samples for its memory, got {num_samples}")
        self.feat_dim, self.num_samples = int(feat_dim), int(num_samples)
        self.nce_k, self.temperature, self.momentum = int(nce_k), float(temperature), float(momentum)
        self.generator = generator
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_samples, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_teacher", torch.rand(num_samples, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("z_student", torch.tensor(-1.0))  # < 0: not set yet
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._z_known = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._z_known = False  # a loaded checkpoint may or may not have fixed Z: look again

    def sample(self, indices: torch.Tensor) -> torch.Tensor:
        """B x (K+1) bank rows: column 0 the samples' own indices, then K uniform draws over all samples."""
        device = self.generator.device if self.generator is not None else self.memory_student.device
        idx = torch.randint(self.num_samples, (indices.shape[0], self.nce_k + 1), generator=self.generator,
                            device=device).to(self.memory_student.device)
        idx[:, 0] = indices
        return idx

    def forward(self, v_student: torch.Tensor, v_teacher: torch.Tensor, indices: torch.Tensor,
                contrast_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(student-anchored, teacher-anchored) B x (K+1) scores exp(<v, bank row> / T) / Z; then the banks'
        positive rows move to normalise(momentum * row + (1 - momentum) * v)."""
        indices = indices.to(self.memory_student.device).long().reshape(-1)
        if contrast_idx is None:
            contrast_idx = self.sample(indices)
        contrast_idx = contrast_idx.to(self.memory_student.device).long()
        with torch.autocast(device_type=self.memory_student.device.type, enabled=False):
            dtype = torch.promote_types(self.memory_student.dtype, torch.float32)  # exp(1 / T) overflows fp16
            v_s, v_t = v_student.to(dtype), v_teacher.to(dtype)
            # the student's embedding is scored against the teacher's bank, and the other way round
            dots_s, dots_t = self.bank_dots(v_s, v_t, contrast_idx)
            out_s = torch.exp(dots_s / self.temperature)
            out_t = torch.exp(dots_t / self.temperature)
            if not self._z_known:  # one host sync until Z is set (or found set, after a checkpoint load)
                if self.z_student < 0:
                    self.z_student.fill_(out_s.detach().mean().item() * self.num_samples)
                if self.z_teacher < 0:
                    self.z_teacher.fill_(out_t.detach().mean().item() * self.num_samples)
                self._z_known = True
            out_s, out_t = out_s / self.z_student, out_t / self.z_teacher
            self.update(v_s.detach(), v_t.detach(), indices)
        return out_s, out_t

    def bank_dots(self, v_s: torch.Tensor, v_t: torch.Tensor, contrast_idx: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """B x (K+1) dot products <teacher bank row, v_s> and <student bank row, v_t> at `contrast_idx`.

        Two ways to the same numbers (they differ only in float summation order, ~1e-7): gather the B (K+1)
        rows and multiply (cheap for few negatives), or, when B (K+1) rows are at least the whole bank, score
        every bank row once with one matrix product and pick the columns: with K near the training-set size
        (CRD's 16,384 negatives of CIFAR's 50,000; all 10,000 samples of a small set) the gather copies
        B (K+1) x feat_dim floats per step, the product only B x num_samples.
        """
        b, k1 = contrast_idx.shape
        dtype = v_s.dtype
        if b * k1 >= self.num_samples:  # copies of the banks: backward needs them as they were before update()
            dots_s = (v_s @ self.memory_teacher.to(dtype, copy=True).T).gather(1, contrast_idx)
            dots_t = (v_t @ self.memory_student.to(dtype, copy=True).T).gather(1, contrast_idx)
            return dots_s, dots_t
        flat = contrast_idx.reshape(-1)
        w_t = self.memory_teacher.index_select(0, flat).reshape(b, k1, -1).to(dtype)
        w_s = self.memory_student.index_select(0, flat).reshape(b, k1, -1).to(dtype)
        return torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2), torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def update(self, v_student: torch.Tensor, v_teacher: torch.Tensor, indices: torch.Tensor) -> None:
        """Momentum update of the rows `indices` of both banks, renormalised to unit length."""
        for bank, v in ((self.memory_student, v_student), (self.memory_teacher, v_teacher)):
            row = bank.index_select(0, indices) * self.momentum + v.to(bank.dtype) * (1 - self.momentum)
            bank.index_copy_(0, indices, row / row.pow(2).sum(1, keepdim=True).sqrt())
