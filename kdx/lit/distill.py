"""Distillation from a frozen teacher: a mixin any LightningModule can use, and the classification module.

The teacher is held outside the module's registered children: it is moved with the module, kept in eval
mode, run under no_grad, never handed to the optimizer, never wrapped by DDP (nothing to synchronise),
and left out of checkpoints unless `save_teacher` is set. The distillers (kdx.distill) are registered
children: their trainable parts are optimised with the student and their state is checkpointed.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from kdx.distill import DistillBatch, DistillerSet, LayerTaps, build_distiller_set
from kdx.errors import ConfigError
from kdx.lit.classifier import ClassifierModule
from kdx.models import find_head

Outputs = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


def check_alpha(alpha: float) -> float:
    """Return `alpha` if it lies in [0, 1], else raise a ConfigError naming distill.alpha."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, labels, sample indices or None) of a training batch of 2 or 3 items."""
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    return batch[0], batch[1], None


class DistillationMixin:
    """Adds a frozen teacher and a set of weighted distillers to a LightningModule.

    Total loss = alpha * sum_m weight_m * loss_m + (1 - alpha) * hard-label loss (+ unscaled regularisers).
    """

    _kdx_teacher: nn.Module | None = None
    _student_taps: LayerTaps | None = None
    _teacher_taps: LayerTaps | None = None

    def configure_distillation(self, teacher: nn.Module, distillers: DistillerSet | Mapping[str, Any],
                               alpha: float = 0.9, save_teacher: bool = False, task: str = "classification") -> None:
        """Freeze and attach `teacher`; register the distillers (a DistillerSet or a `distill` config section)."""
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "_kdx_teacher", teacher)  # deliberately not a registered submodule
        if not isinstance(distillers, DistillerSet):
            distillers = build_distiller_set(distillers, task=task)
        self.distillers = distillers
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

    def attach_taps(self, student: nn.Module, teacher: nn.Module | None, student_embedding_input: str | None = None,
                    teacher_embedding_input: str | None = None) -> None:
        """Hook the layers the distillers read; `*_embedding_input` names a module whose input is the embedding."""
        self.distillers.bind(student, teacher)
        wants_embedding = "embedding" in self.distillers.needs
        s_inputs = [student_embedding_input] if wants_embedding and student_embedding_input else []
        t_inputs = [teacher_embedding_input] if wants_embedding and teacher_embedding_input else []
        teacher_layers = self.distillers.teacher_layers()
        if teacher is None and teacher_layers:
            raise ConfigError(f"distill.method reads teacher layers {teacher_layers}, but this teacher has no "
                              "inspectable layers (an ONNX model); choose a method on outputs only, or a torch teacher")
        self._student_taps = LayerTaps(student, self.distillers.student_layers(), s_inputs, role="student")
        self._teacher_taps = LayerTaps(teacher, teacher_layers, t_inputs, role="teacher") if teacher is not None \
            else LayerTaps(nn.Identity())
        self._embedding_inputs = (student_embedding_input, teacher_embedding_input)

    def distill_batch(self, x: torch.Tensor, labels: torch.Tensor | None, indices: torch.Tensor | None,
                      student_fn: Outputs, teacher_fn: Outputs) -> DistillBatch:
        """Run teacher (first, without a graph) and student on `x`; everything the distillers read, as one dict."""
        batch: DistillBatch = {"images": x, "epoch": int(self.current_epoch) if self._trainer is not None else 0,
                               "max_epochs": int(self.trainer.max_epochs or 0) if self._trainer is not None else 0}
        if labels is not None:
            batch["labels"] = labels
        if indices is not None:
            batch["indices"] = indices
        for role, taps, fn in (("teacher", self._teacher_taps, teacher_fn), ("student", self._student_taps, student_fn)):
            with torch.set_grad_enabled(role == "student" and torch.is_grad_enabled()), taps.recording():
                outputs = dict(fn(x))
            features, inputs = taps.take()
            path = self._embedding_inputs[0 if role == "student" else 1]
            if path in inputs and "embedding" not in outputs:
                outputs["embedding"] = inputs[path].flatten(1)
            for name, value in outputs.items():
                batch[f"{role}_{name}"] = value
            batch[f"{role}_features"] = features
        return batch

    @torch.no_grad()
    def setup_distillers(self, example_input: torch.Tensor, student_fn: Outputs, teacher_fn: Outputs,
                         num_samples: int | None = None, num_classes: int | None = None) -> None:
        """Let the distillers build their trainable parts from one probe batch (student in eval mode)."""
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            n = example_input.shape[0]
            probe = self.distill_batch(example_input, torch.zeros(n, dtype=torch.long), torch.arange(n),
                                       student_fn, teacher_fn)
        finally:
            for m, mode in modes.items():
                m.training = mode
        probe["num_classes"] = num_classes
        self.distillers.setup(probe, num_samples=num_samples)

    def distillation_losses(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        """Every distiller's terms times its weight times alpha, by name."""
        return {name: self.distill_alpha * value for name, value in self.distillers(batch).items()}

    def mix_losses(self, own: dict[str, torch.Tensor], distilled: dict[str, torch.Tensor],
                   hard_keys: Sequence[str] = ("ce",)) -> dict[str, torch.Tensor]:
        """Own hard-label terms scaled by (1 - alpha), other own terms as they are, plus the distillation terms."""
        scale = 1.0 - self.distill_alpha
        mixed = {k: (v * scale if k in hard_keys else v) for k, v in own.items() if not (k in hard_keys and scale == 0)}
        clash = set(mixed) & set(distilled)
        if clash:
            raise ConfigError(f"distillation terms {sorted(clash)} clash with the student's own loss terms")
        return {**mixed, **distilled}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.save_teacher:
            checkpoint["teacher_state_dict"] = {k: v.cpu() for k, v in self.teacher.state_dict().items()}


class DistillationModule(DistillationMixin, ClassifierModule):
    """A classifier student trained on the labels and on what a frozen teacher says (any registered method).

    `distill` is a DistillerSet or a `distill` config section, e.g. {"method": "dkd", "beta": 8.0}.
    `example_input` (a few training images) lets feature methods size their connectors; `num_samples`
    (the training-set size) sizes memory banks.
    """

    def __init__(self, net: nn.Module, teacher: nn.Module, num_classes: int,
                 distill: DistillerSet | Mapping[str, Any] | None = None, alpha: float = 0.9,
                 save_teacher: bool = False, example_input: torch.Tensor | None = None,
                 num_samples: int | None = None, **classifier_kwargs: Any) -> None:
        super().__init__(net, num_classes, **classifier_kwargs)
        self.save_hyperparameters(ignore=["net", "teacher", "distill", "example_input"])
        self.configure_distillation(teacher, distill if distill is not None else {"method": "kd"}, alpha, save_teacher)
        self.attach_taps(net, teacher, self.head_path, find_head(teacher)[0])
        if example_input is None:
            size = self.model_meta.get("image_size", 32)
            size = (size, size) if isinstance(size, int) else tuple(size)
            example_input = torch.zeros(2, int(self.model_meta.get("in_chans", 3)), *size)
        self.setup_distillers(example_input, self._student_outputs, self._teacher_outputs, num_samples, num_classes)

    def _student_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}

    def _teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.teacher_forward(x)}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, indices = split_batch(batch)
        db = self.distill_batch(x, y, indices, self._student_outputs, self._teacher_outputs)
        own = self.supervised_losses(db["student_logits"], y)
        return self.log_terms(self.mix_losses(own, self.distillation_losses(db)), batch_size=y.shape[0])

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The student's groups, plus the distillers' trainable parts (connectors, heads) at the base lr."""
        groups = super().parameter_groups()
        extra = [p for p in self.distillers.parameters() if p.requires_grad]
        if extra:
            groups.append({"params": extra})
        return groups
