"""Face recognition as a Lightning module: margin-softmax training of an embedding network, and verification
on held-out identities (distillation from a face teacher: kdx.lit.face_distill).

Training batches are (images, identity labels); evaluation batches are (images, image index, pair is same)
with images 2i and 2i+1 forming pair i (see kdx.data.face). Validation and test log, insightface-style
(embeddings of each image plus its horizontal flip, 10-fold accuracy):
`{val,test}/verif_acc`, `/verif_acc_std`, `/threshold`, `/auc`, `/tar@far=1e-1`, `/tar@far=1e-2`, ...
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from kdx.checkpoints import plain_metadata
from kdx.errors import ConfigError, DataError
from kdx.data.batch import as_train_batch, batch_images
from kdx.lit.layout import LayoutMixin
from kdx.lit.loss_logging import LossTermsMixin
from kdx.lit.optim import configure_optimization
from kdx.losses.margin import margin_loss
from kdx.models.margin_heads import build_margin_head
from kdx.metrics.verification import VerificationMetric
from kdx.models.embedding import fit_input, model_input_size

DEFAULT_FARS = (1e-1, 1e-2, 1e-3)


class FaceModule(LayoutMixin, LossTermsMixin, pl.LightningModule):
    """An embedding network trained with a combined-margin softmax over the training identities.

    `net` maps B x C x H x W to B x D; batches of another size are resized to `input_size` first (so a small
    student can learn from data prepared at its teacher's resolution). The margin head is used in training only.
    """

    def __init__(self, net: nn.Module, num_classes: int, margin: Mapping[str, Any] | None = None,
                 optim: Mapping[str, Any] | None = None, model_meta: Mapping[str, Any] | None = None,
                 input_size: Sequence[int] | None = None, flip_eval: bool = True, nrof_folds: int = 10,
                 far_targets: Sequence[float] = DEFAULT_FARS, bn_recalibration_batches: int = 0) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.embedding_size = int(getattr(net, "embedding_size", 0) or (model_meta or {}).get("embedding_size", 0))
        if self.embedding_size <= 0:
            raise ConfigError("the face network has no `embedding_size`; build it with kdx.models.build_embedding_model")
        self.margin_cfg = dict(margin or {})
        self.head = build_margin_head(self.embedding_size, self.num_classes, **self.margin_cfg)
        self.optim_cfg = dict(optim or {})
        self.model_meta = dict(model_meta or {})
        self.input_size = tuple(input_size) if input_size is not None else model_input_size(net)
        self.flip_eval = bool(flip_eval)
        self.far_targets = tuple(float(f) for f in far_targets)
        self.bn_recalibration_batches = int(bn_recalibration_batches)
        self._eval_batch_idx = -1
        self.save_hyperparameters(ignore=["net", "teacher", "distill", "example_input"])
        self.metrics = nn.ModuleDict({stage: VerificationMetric(nrof_folds=nrof_folds, far_targets=self.far_targets)
                                      for stage in ("val", "test")})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of a batch (resized to the network's input size when needed)."""
        return self.net(fit_input(x, self.input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def own_losses(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's own loss terms: `margin` (cross-entropy of the margin logits)."""
        return {"margin": margin_loss(self.head(embeddings, labels), labels)}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        b = as_train_batch(batch)
        x, y = b["images"], b["labels"]
        return self.log_terms(self.own_losses(self.embed(x), y), batch_size=y.shape[0])

    # ------------------------------------------------------------------ verification
    def _eval_step(self, batch, stage: str) -> None:
        if len(batch) != 3:
            raise DataError("face evaluation batches must be (images, image index, pair is same); use a face "
                            "datamodule (kdx.data.face) for validation and test")
        x, index, issame = batch
        emb = self.embed(x)
        flipped = self.embed(x.flip(-1)) if self.flip_eval else None
        self.metrics[stage].update(emb, issame, index, flipped)
        # score on the last batch, so callbacks' on_*_epoch_end hooks (printing, early stopping) see this epoch's values
        trainer = self._trainer
        counts = None if trainer is None else (trainer.num_test_batches if stage == "test" else trainer.num_val_batches)
        if counts and batch_idx_is_last(self._eval_batch_idx, counts[0]):
            self._log_verification(stage)

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches) -> int:
        """Recompute the network's BatchNorm running statistics as plain averages over `batches` (precise BN).

        Short runs leave running statistics dominated by the first steps' activations, which in eval mode can
        collapse every embedding onto one direction; the averages over current training batches fix that.
        Returns the number of batches used.
        """
        bns = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns:
            return 0
        momenta = [m.momentum for m in bns]
        modes = {m: m.training for m in self.net.modules()}
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        self.net.train()
        used = 0
        try:
            for batch in batches:
                if used >= self.bn_recalibration_batches:
                    break
                self.embed(batch_images(batch).to(self.device))
                used += 1
        finally:
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
            for m, mode in modes.items():
                m.training = mode
        return used

    def on_validation_epoch_start(self) -> None:
        trainer = self.trainer
        if self.bn_recalibration_batches <= 0 or trainer is None or trainer.sanity_checking or \
                trainer.state.fn != "fit" or trainer.datamodule is None:
            return
        self.recalibrate_batchnorm(trainer.datamodule.train_dataloader())

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_batch_idx = batch_idx
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_batch_idx = batch_idx
        self._eval_step(batch, "test")

    def _log_verification(self, stage: str) -> None:
        metric = self.metrics[stage]
        if self._trainer is not None and self.trainer.sanity_checking:  # a partial pass cannot be scored
            metric.reset()
            return
        if not metric.update_called:  # already scored on the last batch
            return
        try:
            values = metric.compute()  # gathers every rank's embeddings (torchmetrics sync) before scoring
        except DataError as e:
            raise DataError(f"{e} (face verification needs every pair: keep trainer.limit_val_batches and "
                            "trainer.limit_test_batches at 1.0)") from None
        finally:
            metric.reset()
        logged = {"verif_acc": values["accuracy"], "verif_acc_std": values["accuracy_std"],
                  "threshold": values["best_threshold"], "auc": values["auc"]}
        logged.update({k: v for k, v in values.items() if k.startswith("tar@far=")})
        for name, value in logged.items():  # identical on every rank already: no further reduction
            self.log(f"{stage}/{name}", float(value), prog_bar=name == "verif_acc", sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_verification("val")

    def on_test_epoch_end(self) -> None:
        self._log_verification("test")

    # ------------------------------------------------------------------ optimisation and checkpoints
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters of the network, the margin head and any other student-side module."""
        params = [p for n, p in self.named_parameters() if p.requires_grad]
        return [{"params": params}]

    def configure_optimizers(self):
        return configure_optimization(self, self.parameter_groups(), self.optim_cfg)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # enough to rebuild the embedding network (kdx.checkpoints.load_embedding_model) and its margin head
        checkpoint["kdx"] = {"task": "face", "embedding_model": dict(self.model_meta), "network_prefix": "net.",
                             "head_prefix": "head.", "num_classes": self.num_classes,
                             "margin": dict(self.margin_cfg),
                             "class_names": list(self.model_meta.get("class_names") or [])}
        checkpoint["kdx"]["embedding_model"].pop("class_names", None)
        plain_metadata(checkpoint)  # loadable with weights_only=True (kdx.checkpoints)


def batch_idx_is_last(batch_idx: int, num_batches: float | int) -> bool:
    """True when `batch_idx` is the last of `num_batches` (never for an unknown, infinite count)."""
    return num_batches != float("inf") and batch_idx == int(num_batches) - 1
