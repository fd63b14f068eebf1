"""Supervised and transfer-learning training of one classifier."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from kdx.checkpoints import plain_metadata
from kdx.data.batch import as_train_batch
from kdx.lit.layout import LayoutMixin
from kdx.lit.loss_logging import LossTermsMixin
from kdx.lit.optim import configure_optimization
from kdx.losses.logits import mixed_cross_entropy
from kdx.models import classifier_path


class ClassifierModule(LayoutMixin, LossTermsMixin, pl.LightningModule):
    """Cross-entropy training of `net` with top-1/top-5 accuracy; optional transfer-learning controls.

    Transfer learning: `freeze_backbone` trains only the classifier; `backbone_lr_scale` < 1 gives the
    backbone a smaller learning rate; `l2sp_weight` > 0 adds lambda * ||w - w_pretrained||^2 over the
    backbone (Li et al. 2018), on top of the optimizer's weight decay.
    """

    def __init__(self, net: nn.Module, num_classes: int, optim: dict[str, Any] | None = None,
                 label_smoothing: float = 0.0, freeze_backbone: bool = False, backbone_lr_scale: float = 1.0,
                 l2sp_weight: float = 0.0, model_meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.optim_cfg = dict(optim or {})
        self.label_smoothing = float(label_smoothing)
        self.freeze_backbone = bool(freeze_backbone)
        self.backbone_lr_scale = float(backbone_lr_scale)
        self.l2sp_weight = float(l2sp_weight)
        self.model_meta = dict(model_meta or {})
        self.head_path = classifier_path(net)
        self.save_hyperparameters(ignore=["net", "teacher", "distill", "example_input"])
        if self.freeze_backbone:
            for name, p in self.net.named_parameters():
                p.requires_grad_(name.startswith(self.head_path + "."))
        if self.l2sp_weight > 0:  # reference copy of the starting (pretrained) backbone weights
            for i, (name, p) in enumerate(self._backbone_params()):
                self.register_buffer(f"_l2sp_ref_{i}", p.detach().clone(), persistent=False)
        ks = (1, 5) if self.num_classes > 5 else (1,)  # top-5 only means something above 5 classes
        self.metrics = nn.ModuleDict({
            f"{stage}_acc{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro")
            for stage in ("val", "test") for k in ks
        })

    def _backbone_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.net.named_parameters() if not n.startswith(self.head_path + ".")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def regularisation(self) -> torch.Tensor | None:
        """L2-SP distance to the starting weights, or None when off."""
        if self.l2sp_weight <= 0:
            return None
        params = [p for _, p in self._backbone_params()]
        refs = [getattr(self, f"_l2sp_ref_{i}") for i in range(len(params))]
        return sum(((p - r) ** 2).sum() for p, r in zip(params, refs) if p.requires_grad)

    def supervised_losses(self, logits: torch.Tensor, y: torch.Tensor, partner_labels: torch.Tensor | None = None,
                          lam: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms of plain supervised training: ce (+ l2sp); mixed images (data.mix) give the
        partner's labels and the own image's share `lam`."""
        labeled = y >= 0  # unlabeled images (label -1, kdx.data.unlabeled) count for distillation only
        if partner_labels is not None and lam is not None:
            ce = mixed_cross_entropy(logits, y, partner_labels, lam, self.label_smoothing)
        elif bool(labeled.all()):
            ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        elif bool(labeled.any()):
            ce = F.cross_entropy(logits[labeled], y[labeled], label_smoothing=self.label_smoothing)
        else:
            ce = logits.sum() * 0.0
        terms = {"ce": ce}
        reg = self.regularisation()
        if reg is not None:
            terms["l2sp"] = self.l2sp_weight * reg
        return terms

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        b = as_train_batch(batch)
        terms = self.supervised_losses(self.net(b["images"]), b["labels"], b.get("partner_labels"), b.get("lam"))
        return self.log_terms(terms, batch_size=b["labels"].shape[0])

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        logits = self.net(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=y.shape[0])
        for key, metric in self.metrics.items():
            if key.startswith(stage + "_"):
                metric.update(logits, y)
                self.log(f"{stage}/{key.split('_', 1)[1]}", metric, on_epoch=True, prog_bar=key.endswith("acc1"))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters, the backbone's with `backbone_lr_scale`."""
        head = [p for n, p in self.net.named_parameters() if n.startswith(self.head_path + ".") and p.requires_grad]
        backbone = [p for _, p in self._backbone_params() if p.requires_grad]
        groups = [{"params": head}]
        if backbone:
            groups.append({"params": backbone, "lr_scale": self.backbone_lr_scale})
        return groups

    def configure_optimizers(self):
        return configure_optimization(self, self.parameter_groups(), self.optim_cfg)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # enough to rebuild the trained network from the checkpoint alone (kdx.checkpoints.load_network)
        checkpoint["kdx"] = {**self.model_meta, "network_prefix": "net.", "num_classes": self.num_classes}
        plain_metadata(checkpoint)  # loadable with weights_only=True (kdx.checkpoints)
