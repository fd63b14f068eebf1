"""Tian et al. 2020, "Contrastive Representation Distillation" (CRD): NCE against per-sample memory banks."""
from __future__ import annotations

import math

import torch
from torch import nn

from kdx.distill.base import Distiller, register_distiller
from kdx.errors import ConfigError
from kdx.losses.contrastive import ContrastMemory, EmbedHead, crd_loss


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a whole number >= 1, got {value!r}")
    return int(value)


@register_distiller
class CRD(Distiller):
    """Student and teacher embeddings projected to `feat_dim` (linear + L2 norm, both heads trained) and
    contrasted with `nce_k` negatives from two memory banks of the training set (`num_samples` rows each).

    Negatives are drawn uniformly over all training samples (the reference's alias sampler), not by class
    (the reference's 'exact' data mode). `nce_k` above num_samples - 1 is lowered to num_samples - 1 silently.
    `nce_t` is the temperature, `nce_momentum` the banks' update momentum. Needs sample indices, so the
    datamodule yields (images, labels, indices); the banks are not synchronised across DDP processes.
    """

    name = "crd"
    needs = frozenset({"embedding", "indices"})
    tasks = frozenset({"classification", "face"})
    paper = "Tian et al. 2020, ICLR, arXiv:1910.10699"

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_momentum: float = 0.5) -> None:
        super().__init__()
        self.feat_dim = _positive_int(feat_dim, "distill.feat_dim")
        self.nce_k = _positive_int(nce_k, "distill.nce_k")
        if isinstance(nce_t, bool) or not isinstance(nce_t, (int, float)) or not (math.isfinite(nce_t) and nce_t > 0):
            raise ConfigError(f"distill.nce_t must be a temperature > 0, got {nce_t!r}")
        if isinstance(nce_momentum, bool) or not isinstance(nce_momentum, (int, float)) or not 0 <= nce_momentum <= 1:
            raise ConfigError(f"distill.nce_momentum must be a number in [0, 1], got {nce_momentum!r}")
        self.nce_t, self.nce_momentum = float(nce_t), float(nce_momentum)
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None
        self.memory: ContrastMemory | None = None
        self.num_samples: int | None = None
        self._indices_checked = False

    def setup(self, probe, num_samples=None, generator: torch.Generator | None = None) -> None:
        if num_samples is None:
            raise ConfigError("method crd needs the training set size and sample indices; train it with kdx-train "
                              "(or pass num_samples=len(train_set) to the module) on a datamodule that yields indices")
        if num_samples < 2:
            raise ConfigError(f"method crd needs a training set of at least 2 samples, got num_samples={num_samples}")
        for role in ("student", "teacher"):
            if f"{role}_embedding" not in probe:
                raise ConfigError(f"method crd reads the {role} embedding, but the host gives none; "
                                  f"choose a {role} with a linear classifier head")
        s_dim = probe["student_embedding"].flatten(1).shape[1]
        t_dim = probe["teacher_embedding"].flatten(1).shape[1]
        self.num_samples = int(num_samples)
        self.embed_student = EmbedHead(s_dim, self.feat_dim)
        self.embed_teacher = EmbedHead(t_dim, self.feat_dim)
        self.memory = ContrastMemory(self.feat_dim, self.num_samples, min(self.nce_k, self.num_samples - 1),
                                     self.nce_t, self.nce_momentum, generator=generator)

    def forward(self, batch):
        if self.memory is None:
            raise RuntimeError("CRD.setup() has not been called")
        if not self._indices_checked:  # once: a wrong index would read another sample's memory row (or crash)
            idx = batch["indices"]
            if idx.ndim != 1 or idx.shape[0] != batch["student_embedding"].shape[0] or \
                    int(idx.min()) < 0 or int(idx.max()) >= self.num_samples:
                raise ConfigError(f"method crd got sample indices {idx.tolist()[:8]}... for a training set of "
                                  f"{self.num_samples}; the datamodule must yield each image's index in its train set")
            self._indices_checked = True
        v_s = self.embed_student(batch["student_embedding"])
        v_t = self.embed_teacher(batch["teacher_embedding"])
        out_s, out_t = self.memory(v_s, v_t, batch["indices"])
        return {"crd": crd_loss(out_s, out_t, self.num_samples)}
