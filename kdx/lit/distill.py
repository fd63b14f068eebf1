"""Distillation from a frozen teacher: a mixin any LightningModule can use, and the classification module.

The teacher is held outside the module's registered children: it is moved with the module, kept in eval
mode, run under no_grad, never handed to the optimizer, never wrapped by DDP (nothing to synchronise),
and left out of checkpoints unless `save_teacher` is set. The distillers (kdx.distill) are registered
children: their trainable parts are optimised with the student and their state is checkpointed.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from kdx.data.batch import TrainBatch, as_train_batch
from kdx.distill import DistillBatch, DistillerSet, LayerTaps, build_distiller_set, weigh_losses
from kdx.distill.cache import CacheUnavailable, TeacherCache, cache_key, check_cache_config, teacher_fingerprint
from kdx.errors import ConfigError
from kdx.lit.classifier import ClassifierModule
from kdx.models import classifier_path

Outputs = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


def check_alpha(alpha: float) -> float:
    """Return `alpha` if it lies in [0, 1], else raise a ConfigError naming distill.alpha."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


class DistillationMixin:
    """Adds a frozen teacher and a set of weighted distillers to a LightningModule.

    Total loss = alpha * sum_m weight_m * loss_m + (1 - alpha) * hard-label loss (+ unscaled regularisers),
    weighed in one place (`weighed_losses`, kdx.distill.weigh_losses).
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
        self._embedding_inputs = {"student": student_embedding_input, "teacher": teacher_embedding_input}

    def distill_batch(self, batch: TrainBatch, student_fn: Outputs, teacher_fn: Outputs) -> DistillBatch:
        """Run teacher (first, without a graph; from the teacher cache when it has this view) and student on a
        training record (kdx.data.batch): everything the distillers read, as one dict.

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
        cache = getattr(self, "teacher_cache", None)
        if cache is not None and indices is not None and views is not None:
            run_teacher = lambda xs: self._run(xs, teacher_fn, "teacher")[0]  # noqa: E731
            teacher_out, teacher_features = cache(teacher_x, indices, views, run_teacher), {}
        else:
            teacher_out, teacher_features = self._run(teacher_x, teacher_fn, "teacher")
        student_out, student_features = self._run(x, student_fn, "student")
        if labels is not None and "logits" in teacher_out and bool((labels < 0).any()):
            # unlabeled images: methods that read labels (DKD) get the teacher's prediction as the label
            db["labels"] = torch.where(labels < 0, teacher_out["logits"].argmax(1).to(labels.dtype), labels)
        for role, outputs, features in (("teacher", teacher_out, teacher_features),
                                        ("student", student_out, student_features)):
            for name, value in outputs.items():
                db[f"{role}_{name}"] = value
            db[f"{role}_features"] = features
        return db

    def _run(self, x: torch.Tensor, fn: Outputs, role: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One network's named outputs (with the embedding read at its classifier's input) and tapped features."""
        taps = {"student": self._student_taps, "teacher": self._teacher_taps}[role]
        with torch.set_grad_enabled(role == "student" and torch.is_grad_enabled()), taps.recording():
            outputs = dict(fn(x))
        features, inputs = taps.take()
        path = self._embedding_inputs[role]
        if path in inputs and "embedding" not in outputs:
            outputs["embedding"] = inputs[path].flatten(1)
        return outputs, features

    @torch.no_grad()
    def setup_distillers(self, example_input: torch.Tensor, student_fn: Outputs, teacher_fn: Outputs,
                         num_samples: int | None = None, num_classes: int | None = None) -> DistillBatch:
        """Let the distillers build their trainable parts from one probe batch (student in eval mode); returns it."""
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            n = example_input.shape[0]
            probe = self.distill_batch({"images": example_input, "labels": torch.zeros(n, dtype=torch.long),
                                        "index": torch.arange(n)}, student_fn, teacher_fn)
        finally:
            for m, mode in modes.items():
                m.training = mode
        probe["num_classes"] = num_classes
        self.distillers.setup(probe, num_samples=num_samples)
        self._probe_shapes = {k[len("teacher_"):]: int(v.shape[1]) for k, v in probe.items()
                              if k.startswith("teacher_") and isinstance(v, torch.Tensor) and v.ndim == 2}
        return probe

    def configure_teacher_cache(self, settings: Mapping[str, Any] | str | None, identity: Mapping[str, Any],
                                seed: int, num_samples: int, max_epochs: int | None,
                                teacher_file: str | None = None, fixed_teacher: bool = False) -> TeacherCache | None:
        """Serve the teacher's outputs from a TeacherCache (`distill.teacher_cache`), or do nothing when it is off.

        `identity` describes the data source and its transforms (mixing and the teacher's view included); with
        the teacher's weights, the seed and the view scheme it names the store. The datamodule must give seeded
        views (see kdx.data.views). `fixed_teacher`: the teacher sees one clean image per sample (one stored view).
        """
        settings = check_cache_config(settings)
        self.teacher_cache = None
        if settings["mode"] == "off":
            return None
        if self.distillers.teacher_layers():
            raise ConfigError(f"distill.teacher_cache stores outputs only, but the methods read teacher layers "
                              f"{self.distillers.teacher_layers()}; set distill.teacher_cache.mode=off")
        views = 1 if fixed_teacher else settings["views"]
        if not views and not (max_epochs and max_epochs > 0):
            raise ConfigError("distill.teacher_cache with a new view every epoch needs trainer.max_epochs; set it, "
                              "or set distill.teacher_cache.views=K")
        outputs = dict(self._probe_shapes)
        key = cache_key(teacher_fingerprint(self.teacher, teacher_file), identity, seed, views, settings["topk"], outputs)
        try:
            self.teacher_cache = TeacherCache(key, num_samples, views or int(max_epochs), outputs,
                                              mode=settings["mode"], root=settings["dir"], topk=settings["topk"],
                                              meta={"data": dict(identity), "seed": seed, "views": views})
        except CacheUnavailable as e:  # never a reason to stop: the teacher is simply computed
            warnings.warn(f"{e}; the teacher is computed without a cache")
        return self.teacher_cache

    def on_train_epoch_end(self) -> None:
        cache = getattr(self, "teacher_cache", None)
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
        self.attach_taps(net, teacher, self.head_path, classifier_path(teacher))
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
        b = as_train_batch(batch)
        db = self.distill_batch(b, self._student_outputs, self._teacher_outputs)
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


LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers", "persistent_workers", "pin_memory", "name")


def apply_teacher_cache(module: DistillationMixin, dm: Any, data_cfg: Mapping[str, Any], settings: Any, seed: int,
                        max_epochs: int | None, teacher_spec: Mapping[str, Any] | None = None,
                        teacher_file: str | None = None) -> None:
    """Switch the datamodule to seeded views and give the module its teacher cache, as `distill.teacher_cache` says.

    The store's identity is the data config without its loader settings (source, subset, transforms), the
    datamodule's sizes, what its training set holds today (`dm.data_fingerprint()`: file sizes and modification
    times, or a hash of in-memory images), the teacher spec (ONNX preprocessing) and the seed, with the teacher's
    weights. Images replaced in place therefore get a new store, never the outputs of the old ones.
    """
    settings = check_cache_config(settings)
    if settings["mode"] == "off":
        return
    if not hasattr(dm, "seeded_views"):
        raise ConfigError(f"distill.teacher_cache needs seeded views, which {type(dm).__name__} does not give; "
                          "use a kdx datamodule or set distill.teacher_cache.mode=off")
    fingerprint = dm.data_fingerprint() if callable(getattr(dm, "data_fingerprint", None)) else None
    if fingerprint is None:
        warnings.warn(f"the teacher cache cannot tell whether the images of {type(dm).__name__} change (its training "
                      "set has no fingerprint() or samples list); after changing them, set a new "
                      "distill.teacher_cache.dir or distill.teacher_cache.mode=off")
    identity = {"data": {k: v for k, v in dict(data_cfg).items() if k not in LOADER_KEYS},
                "sizes": dm.describe(), "contents": fingerprint, "teacher": dict(teacher_spec or {})}
    dm.seeded_views, dm.view_count, dm.view_seed = True, settings["views"], int(seed)
    module.configure_teacher_cache(settings, identity, int(seed), len(dm.train_set), max_epochs, teacher_file,
                                   fixed_teacher=getattr(dm, "teacher_view", "consistent") == "fixed")
