"""Distillation from a frozen teacher: a mixin any LightningModule can use, and the classification module.

The teacher comes as one object built before the module, a `kdx.distill.source.TeacherSource`: the frozen
network, the teacher layers the distillers read and the optional teacher cache behind one call,
`source(x, index, view) -> (outputs, features)`. The module holds it outside its registered children: it is
moved with the module, kept in eval mode, run under no_grad, never handed to the optimizer, never wrapped by DDP
(nothing to synchronise), and left out of checkpoints unless `save_teacher` is set. The distillers (kdx.distill)
are registered children: their trainable parts are optimised with the student and their state is checkpointed.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from kdx.data.batch import TrainBatch, as_train_batch
from kdx.distill import DistillBatch, DistillerSet, LayerTaps, build_distiller_set, weigh_losses
from kdx.distill.settings import ALPHA_DEFAULTS
from kdx.distill.source import TeacherSource, classifier_source
from kdx.errors import ConfigError
from kdx.lit.classifier import ClassifierModule

Outputs = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


def check_alpha(alpha: float) -> float:
    """Return `alpha` if it lies in [0, 1], else raise a ConfigError naming distill.alpha."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def distiller_set(distill: DistillerSet | Mapping[str, Any] | None, default: str, task: str) -> DistillerSet:
    """`distill` as a DistillerSet: a set as it is, a `distill` config section built, None the `default` method."""
    if isinstance(distill, DistillerSet):
        return distill
    return build_distiller_set(distill if distill is not None else {"method": default}, task=task)


class DistillationMixin:
    """Adds a frozen teacher (a TeacherSource) and a set of weighted distillers to a LightningModule.

    Total loss = alpha * sum_m weight_m * loss_m + (1 - alpha) * hard-label loss (+ unscaled regularisers),
    weighed in one place (`weighed_losses`, kdx.distill.weigh_losses).
    """

    _teacher_source: TeacherSource | None = None
    _student_taps: LayerTaps | None = None

    def configure_distillation(self, source: TeacherSource, student: nn.Module,
                               alpha: float = ALPHA_DEFAULTS["classification"],
                               save_teacher: bool = False, student_embedding_input: str | None = None) -> None:
        """Attach the teacher `source` (built, with its distillers bound, before the module) and register its
        distillers; hook the student layers they read (`student_embedding_input`: a module of the student whose
        input is the embedding, read when a method reads embeddings)."""
        if not isinstance(source, TeacherSource):
            raise TypeError(f"configure_distillation takes a kdx.distill.source.TeacherSource, got "
                            f"{type(source).__name__}; build one with classifier_source or face_source")
        self.distill_alpha = check_alpha(alpha)
        object.__setattr__(self, "_teacher_source", source)  # deliberately not a registered submodule
        self.distillers = source.distillers
        self.save_teacher = bool(save_teacher)
        wants_embedding = "embedding" in self.distillers.needs
        inputs = [student_embedding_input] if wants_embedding and student_embedding_input else []
        self._student_taps = LayerTaps(student, self.distillers.student_layers(), inputs, role="student")
        self._student_embedding_input = student_embedding_input

    @property
    def teacher_source(self) -> TeacherSource:
        """The teacher source: the frozen network, its layer taps and its cache behind one call."""
        if self._teacher_source is None:
            raise RuntimeError("configure_distillation() has not been called")
        return self._teacher_source

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network."""
        return self.teacher_source.network

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half() reach the teacher too
        out = super()._apply(fn, *args, **kwargs)
        if self._teacher_source is not None:
            self._teacher_source.network._apply(fn, *args, **kwargs)
        return out

    def compiled_networks(self) -> list[nn.Module]:
        """The student and the teacher's torch network (none for an ONNX teacher), for trainer.compile."""
        nets = list(super().compiled_networks())
        torch_teacher = self._teacher_source.layer_network if self._teacher_source is not None else None
        return nets + [torch_teacher] if isinstance(torch_teacher, nn.Module) else nets

    def distill_batch(self, batch: TrainBatch, student_fn: Outputs) -> DistillBatch:
        """Ask the teacher source (first, without a graph; from its cache when it has this view), then run the
        student on a training record (kdx.data.batch): everything the distillers read, as one dict.

        The teacher sees `teacher_images` when the record has them (data.teacher_view fixed or independent),
        else exactly the student's `images` (consistent teaching)."""
        x, labels, indices = batch["images"], batch.get("labels"), batch.get("index")
        teacher_x = batch.get("teacher_images", x)
        views = batch.get("teacher_view", batch.get("view"))
        trainer = self._trainer  # None outside a Trainer (a host called by hand)
        db: DistillBatch = {"images": x, "epoch": int(trainer.current_epoch) if trainer is not None else 0,
                            "max_epochs": int(trainer.max_epochs or 0) if trainer is not None else 0}
        if labels is not None:
            db["labels"] = labels
        if indices is not None:
            db["indices"] = indices
        teacher_out, teacher_features = self.teacher_source(teacher_x, indices, views)
        student_out, student_features = self._run_student(x, student_fn)
        if labels is not None and "logits" in teacher_out and bool((labels < 0).any()):
            # unlabeled images: methods that read labels (DKD) get the teacher's prediction as the label
            db["labels"] = torch.where(labels < 0, teacher_out["logits"].argmax(1).to(labels.dtype), labels)
        for role, outputs, features in (("teacher", teacher_out, teacher_features),
                                        ("student", student_out, student_features)):
            for name, value in outputs.items():
                db[f"{role}_{name}"] = value
            db[f"{role}_features"] = features
        return db

    def _run_student(self, x: torch.Tensor, fn: Outputs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The student's named outputs (with the embedding read at its classifier's input) and tapped features."""
        with self._student_taps.recording():
            outputs = dict(fn(x))
        features, inputs = self._student_taps.take()
        path = self._student_embedding_input
        if path in inputs and "embedding" not in outputs:
            outputs["embedding"] = inputs[path].flatten(1)
        return outputs, features

    @torch.no_grad()
    def setup_distillers(self, example_input: torch.Tensor, student_fn: Outputs, num_samples: int | None = None,
                         num_classes: int | None = None) -> DistillBatch:
        """Let the distillers build their trainable parts from one probe batch (student in eval mode); returns it."""
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            n = example_input.shape[0]
            probe = self.distill_batch({"images": example_input, "labels": torch.zeros(n, dtype=torch.long),
                                        "index": torch.arange(n)}, student_fn)
        finally:
            for m, mode in modes.items():
                m.training = mode
        probe["num_classes"] = num_classes
        self.distillers.setup(probe, num_samples=num_samples)
        return probe

    def on_train_epoch_end(self) -> None:
        cache = self.teacher_source.cache
        if cache is not None and cache.hits + cache.misses:  # share of this epoch's images served from the cache
            self.log("train/teacher_cache_hit_rate", cache.stats()["hit_rate"], sync_dist=True)
            cache.hits = cache.misses = 0
        super().on_train_epoch_end()

    def weighed_losses(self, own: dict[str, torch.Tensor], batch: DistillBatch,
                       hard_keys: Sequence[str] = ("ce",)) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(weighted terms, raw terms) of one step: the student's own terms and every distiller's, weighed in one
        place (kdx.distill.weigh_losses: alpha, 1 - alpha and the methods' weights)."""
        raw, weights = self.distillers.raw_terms(batch)
        return weigh_losses(own, raw, weights, self.distill_alpha, hard_keys), {**own, **raw}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.save_teacher:
            checkpoint["teacher_state_dict"] = self.teacher_source.state_dict()


class DistillationModule(DistillationMixin, ClassifierModule):
    """A classifier student trained on the labels and on what a frozen teacher says (any registered method).

    `teacher` is a TeacherSource built for this student (kdx.distill.source.classifier_source: what kdx.tasks
    passes, its cache included), whose distillers the module trains; or, for use from Python, the teacher network
    itself, from which the module builds a source without a cache for the methods of `distill` (a DistillerSet
    or a `distill` config section, e.g. {"method": "dkd", "beta": 8.0}; default kd). `example_input` (a few
    training images) lets feature methods size their connectors; `num_samples` (the training-set size) sizes
    memory banks.
    """

    def __init__(self, net: nn.Module, teacher: TeacherSource | nn.Module, num_classes: int,
                 distill: DistillerSet | Mapping[str, Any] | None = None,
                 alpha: float = ALPHA_DEFAULTS["classification"],
                 save_teacher: bool = False, example_input: torch.Tensor | None = None,
                 num_samples: int | None = None, **classifier_kwargs: Any) -> None:
        super().__init__(net, num_classes, **classifier_kwargs)
        self.save_hyperparameters(ignore=["net", "teacher", "distill", "example_input"])
        if isinstance(teacher, TeacherSource):
            if distill is not None:
                raise ValueError("distill is decided when the teacher source is built (classifier_source(teacher, "
                                 "distillers, student)); leave it out when `teacher` is a TeacherSource")
            source = teacher
        else:
            source = classifier_source(teacher, distiller_set(distill, "kd", "classification"), net)
        self.configure_distillation(source, net, alpha, save_teacher, student_embedding_input=self.head_path)
        if example_input is None:
            size = self.model_meta.get("image_size", 32)
            size = (size, size) if isinstance(size, int) else tuple(size)
            example_input = torch.zeros(2, int(self.model_meta.get("in_chans", 3)), *size)
        self.setup_distillers(example_input, self._student_outputs, num_samples, num_classes)

    def _student_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        b = as_train_batch(batch)
        db = self.distill_batch(b, self._student_outputs)
        own = self.supervised_losses(db["student_logits"], b["labels"], b.get("partner_labels"), b.get("lam"))
        weighted, raw = self.weighed_losses(own, db)
        return self.log_terms(weighted, batch_size=b["labels"].shape[0], raw=raw)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The student's groups, plus the distillers' trainable parts (connectors, heads) at the base lr."""
        groups = super().parameter_groups()
        extra = [p for p in self.distillers.parameters() if p.requires_grad]
        if extra:
            groups.append({"params": extra})
        return groups
