"""Distillation from a frozen teacher: a mixin any LightningModule can use, and the classification module.

The teacher is held outside the module's registered children: it is moved with the module, kept in eval
mode, run under no_grad, never handed to the optimizer, never wrapped by DDP (nothing to synchronise),
and left out of checkpoints unless `save_teacher` is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from kdx.errors import ConfigError
from kdx.lit.classifier import ClassifierModule
from kdx.losses import LOGIT_LOSSES, check_temperature, dkd_loss

TermFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class DistillTerm:
    """One named distillation loss: `weight * fn(student_outputs, teacher_outputs, target)`."""

    name: str
    weight: float
    fn: TermFn


def check_alpha(alpha: float) -> float:
    """Return `alpha` if it lies in [0, 1], else raise a ConfigError naming distill.alpha."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def logit_terms(weights: Mapping[str, float], temperature: float) -> list[DistillTerm]:
    """DistillTerms on `logits` for names in LOGIT_LOSSES (kd, mse, bce) and dkd, with their weights."""
    temperature = check_temperature(temperature)
    terms = []
    for name, weight in weights.items():
        if name == "dkd":
            fn = lambda s, t, y: dkd_loss(s["logits"], t["logits"], y, temperature)  # noqa: E731
        elif name in LOGIT_LOSSES:
            fn = lambda s, t, y, f=LOGIT_LOSSES[name]: f(s["logits"], t["logits"], temperature)  # noqa: E731
        else:
            raise ConfigError(f"distill.terms has unknown term {name!r}; choose from {sorted([*LOGIT_LOSSES, 'dkd'])}")
        terms.append(DistillTerm(name, float(weight), fn))
    return terms


class DistillationMixin:
    """Adds a frozen teacher and weighted distillation terms to a LightningModule.

    Total loss = alpha * sum_i w_i * term_i + (1 - alpha) * hard-label loss (+ unscaled regularisers).
    """

    _kdx_teacher: nn.Module | None = None

    def configure_distillation(self, teacher: nn.Module, terms: Sequence[DistillTerm], alpha: float = 0.9,
                               save_teacher: bool = False) -> None:
        """Freeze and attach `teacher`; set the terms and alpha."""
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "_kdx_teacher", teacher)  # deliberately not a registered submodule
        self.distill_terms = list(terms)
        self.distill_alpha = check_alpha(alpha)
        self.save_teacher = bool(save_teacher)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network."""
        if self._kdx_teacher is None:
            raise RuntimeError("configure_distillation() has not been called")
        return self._kdx_teacher

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half() reach the teacher too
        out = super()._apply(fn, *args, **kwargs)
        if isinstance(self._kdx_teacher, nn.Module):
            self._kdx_teacher._apply(fn, *args, **kwargs)
        return out

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor) -> Any:
        """The teacher's output for `x`, in eval mode, without building a graph."""
        if self.teacher.training:
            self.teacher.eval()
        return self.teacher(x)

    def distillation_losses(self, student_out: Mapping[str, torch.Tensor], teacher_out: Mapping[str, torch.Tensor],
                            target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term times its weight times alpha, by name."""
        return {t.name: self.distill_alpha * t.weight * t.fn(student_out, teacher_out, target)
                for t in self.distill_terms if t.weight != 0}

    def mix_losses(self, own: dict[str, torch.Tensor], distilled: dict[str, torch.Tensor],
                   hard_keys: Sequence[str] = ("ce",)) -> dict[str, torch.Tensor]:
        """Own hard-label terms scaled by (1 - alpha), other own terms as they are, plus the distillation terms."""
        scale = 1.0 - self.distill_alpha
        mixed = {k: (v * scale if k in hard_keys else v) for k, v in own.items() if not (k in hard_keys and scale == 0)}
        clash = set(mixed) & set(distilled)
        if clash:
            raise ConfigError(f"distill.terms names {sorted(clash)} clash with the student's own loss terms")
        return {**mixed, **distilled}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.save_teacher:
            checkpoint["teacher_state_dict"] = {k: v.cpu() for k, v in self.teacher.state_dict().items()}


class DistillationModule(DistillationMixin, ClassifierModule):
    """A classifier student trained on a frozen teacher's logits plus the labels."""

    def __init__(self, net: nn.Module, teacher: nn.Module, num_classes: int, temperature: float = 4.0,
                 alpha: float = 0.9, terms: Mapping[str, float] | None = None, save_teacher: bool = False,
                 **classifier_kwargs: Any) -> None:
        super().__init__(net, num_classes, **classifier_kwargs)
        self.save_hyperparameters(ignore=["net", "teacher"])
        self.temperature = check_temperature(temperature)
        self.configure_distillation(teacher, logit_terms(dict(terms or {"kd": 1.0}), self.temperature), alpha,
                                    save_teacher)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        teacher_logits = self.teacher_forward(x)  # first: its buffers are freed before the student's graph is built
        student_logits = self.net(x)
        own = self.supervised_losses(student_logits, y)
        distilled = self.distillation_losses({"logits": student_logits}, {"logits": teacher_logits}, y)
        return self.log_terms(self.mix_losses(own, distilled), batch_size=y.shape[0])
