"""Logistic-regression probe: a linear layer fitted on a frozen teacher's penultimate features or logits."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdx.data.batch import as_train_batch
from kdx.errors import ConfigError
from kdx.checkpoints import plain_metadata
from kdx.lit.optim import configure_optimization
from kdx.lit.layout import LayoutMixin
from kdx.lit.loss_logging import LossTermsMixin
from kdx.models import penultimate_features


class LinearProbeModule(LayoutMixin, LossTermsMixin, pl.LightningModule):
    """Fit `Linear(features, classes)` with sigmoid + BCE (one-vs-rest) or softmax + CE; the teacher never changes."""

    def __init__(self, teacher: nn.Module, num_classes: int, num_features: int, loss: str = "bce",
                 inputs: str = "features", optim: dict[str, Any] | None = None) -> None:
        super().__init__()
        if loss not in ("bce", "ce"):
            raise ConfigError(f"task.probe_loss must be 'bce' or 'ce', got {loss!r}")
        if inputs not in ("features", "logits"):
            raise ConfigError(f"task.probe_inputs must be 'features' or 'logits', got {inputs!r}")
        self.save_hyperparameters(ignore=["teacher"])
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher  # registered so it moves with the module; frozen and in eval mode
        self.head = nn.Linear(num_features, num_classes)
        self.num_classes, self.loss_name, self.inputs = num_classes, loss, inputs
        self.optim_cfg = dict(optim or {})
        self.metrics = nn.ModuleDict({s: MulticlassAccuracy(num_classes, average="micro") for s in ("val", "test")})

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # batch-norm statistics of the teacher stay fixed
        return self

    @torch.no_grad()
    def teacher_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the probe sees: the teacher's penultimate features or its logits."""
        features, logits = penultimate_features(self.teacher, x)
        return features if self.inputs == "features" else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.teacher_inputs(x))

    def probe_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """BCE against one-hot targets (each class a logistic regression) or softmax cross-entropy."""
        if self.loss_name == "bce":
            return F.binary_cross_entropy_with_logits(logits, F.one_hot(y, self.num_classes).float())
        return F.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        b = as_train_batch(batch)
        x, y = b["images"], b["labels"]
        loss = self.probe_loss(self(x), y)
        self.check_finite_terms({"probe": loss}, loss)  # a NaN/inf loss stops the run (kdx.lit.loss_logging)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log(f"{stage}/loss", self.probe_loss(logits, y), on_epoch=True, sync_dist=True, batch_size=y.shape[0])
        self.metrics[stage].update(logits, y)
        self.log(f"{stage}/acc1", self.metrics[stage], on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The probe's own weights (the teacher stays frozen)."""
        return [{"params": list(self.head.parameters())}]

    def configure_optimizers(self):
        return configure_optimization(self, self.parameter_groups(), self.optim_cfg)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        plain_metadata(checkpoint)  # loadable with weights_only=True (kdx.checkpoints)
