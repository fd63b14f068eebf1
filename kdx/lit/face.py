"""Face recognition as a Lightning task: margin-softmax training of an embedding network, verification
on held-out identities, and distillation from a frozen face teacher (a kdx checkpoint or an ONNX model).

Training batches are (images, identity labels); evaluation batches are (images, image index, pair is same)
with images 2i and 2i+1 forming pair i (see kdx.data.face). Validation and test log, insightface-style
(embeddings of each image plus its horizontal flip, 10-fold accuracy):
`{val,test}/verif_acc`, `/verif_acc_std`, `/threshold`, `/auc`, `/tar@far=1e-1`, `/tar@far=1e-2`, ...
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from kdx.errors import CheckpointError, ConfigError, DataError, KdxError
from kdx.metrics.verification import VerificationMetric
from kdx.distill import DistillerSet, build_distiller_set, enable_sample_indices
from kdx.lit.distill import DistillationMixin, apply_teacher_cache, split_batch
from kdx.checkpoints import load_embedding_model, plain_metadata, read_checkpoint
from kdx.configs import to_dict
from kdx.lit.terms import LossTermsMixin
from kdx.lit.optim import configure_optimization
from kdx.losses.margin import CombinedMarginHead, margin_loss
from kdx.models.embedding import fit_input, model_input_size

# preset -> (m1, m2, m3): ArcFace additive angular, CosFace additive cosine, normalised softmax
MARGIN_PRESETS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "normsoftmax": (1.0, 0.0, 0.0)}
DEFAULT_FARS = (1e-1, 1e-2, 1e-3)


def build_margin_head(embedding_size: int, num_classes: int, kind: str = "arcface", s: float = 64.0,
                      m1: float | None = None, m2: float | None = None, m3: float | None = None,
                      easy_margin: bool = False) -> CombinedMarginHead:
    """A CombinedMarginHead from a `task.margin` config: preset `kind`, scale `s`, optional m1/m2/m3 overrides."""
    if kind not in MARGIN_PRESETS:
        raise ConfigError(f"task.margin.kind must be one of {', '.join(MARGIN_PRESETS)}, got {kind!r}")
    p1, p2, p3 = MARGIN_PRESETS[kind]
    return CombinedMarginHead(embedding_size, num_classes, s=float(s), m1=float(p1 if m1 is None else m1),
                              m2=float(p2 if m2 is None else m2), m3=float(p3 if m3 is None else m3),
                              easy_margin=bool(easy_margin))


class FaceModule(LossTermsMixin, pl.LightningModule):
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
        x, y = split_batch(batch)[:2]
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
                self.embed(batch[0].to(self.device))
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


# ---------------------------------------------------------------------- distillation
class FaceTeacher(nn.Module):
    """A frozen face teacher: embedding network (torch or ONNX) and, for a kdx face checkpoint, its margin head.

    `forward(x)` returns {"embedding": B x D} and, when the head is present, {"logits": B x K} (scaled cosines).
    """

    def __init__(self, net: nn.Module, head: CombinedMarginHead | None = None, class_names: Sequence[str] | None = None,
                 input_size: Sequence[int] | None = None, source: str = ""):
        super().__init__()
        self.net, self.head = net, head
        self.class_names = list(class_names or [])
        self.input_size = tuple(input_size) if input_size is not None else model_input_size(net)
        self.source = source
        from kdx.models.onnx_teacher import OnnxEmbeddingModel

        self.is_onnx = isinstance(net, OnnxEmbeddingModel)

    @property
    def embedding_size(self) -> int:
        """Size of the teacher's embeddings."""
        return int(self.net.embedding_size)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's outputs for a data-normalised batch."""
        emb = self.net(x if self.is_onnx else fit_input(x, self.input_size)).float()
        out = {"embedding": emb}
        if self.head is not None:
            out["logits"] = self.head(emb)
        return out


def load_face_checkpoint(path: str | Path) -> tuple[nn.Module, CombinedMarginHead | None, dict[str, Any]]:
    """(embedding net, margin head or None, kdx metadata) of a checkpoint written by a face run."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("kdx") if isinstance(ckpt, dict) else None
    if not meta or "embedding_model" not in meta:
        raise CheckpointError(f"checkpoint {path} is not a kdx face checkpoint (no kdx.embedding_model); "
                              "pass the best.ckpt of a task=face run, or an ONNX model as teacher.onnx")
    net = load_embedding_model(path)
    head = None
    prefix = meta.get("head_prefix", "head.")
    head_state = {k[len(prefix):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    if head_state and "weight" in head_state:
        head = build_margin_head(int(meta["embedding_model"]["embedding_size"]), int(meta["num_classes"]),
                                 **(meta.get("margin") or {}))
        head.load_state_dict(head_state)
    return net, head, meta


def build_face_teacher(spec: Mapping[str, Any], data_mean: Any = 0.5, data_std: Any = 0.5) -> FaceTeacher:
    """The frozen teacher of a model spec: `onnx` (a path or `sface`), `ckpt` (a face run) or `name`+`pretrained`."""
    from kdx.models.embedding import build_embedding_model

    onnx, ckpt = spec.get("onnx"), spec.get("ckpt")
    if onnx and ckpt:
        raise ConfigError(f"teacher.onnx={onnx} and teacher.ckpt={ckpt} are both set; keep one (teacher.onnx=null "
                          "to distil from the checkpoint)")
    if onnx:
        from kdx.models.onnx_teacher import OnnxEmbeddingModel, sface_model_path

        path = sface_model_path() if str(onnx).lower() == "sface" else Path(str(onnx)).expanduser()
        pre = dict(spec.get("preprocess") or {})
        unknown = set(pre) - {"input_size", "channel_order", "value_range", "mean", "std", "convert_channels"}
        if unknown:
            raise ConfigError(f"teacher.preprocess has unknown keys {sorted(unknown)}; use input_size, channel_order, "
                              "value_range, mean, std, convert_channels")
        net = OnnxEmbeddingModel(path, input_size=pre.get("input_size"), channel_order=pre.get("channel_order") or "RGB",
                                 value_range=tuple(pre.get("value_range") or (0.0, 255.0)), mean=pre.get("mean"),
                                 std=pre.get("std"), convert_channels=bool(pre.get("convert_channels", True)),
                                 input_mean=data_mean, input_std=data_std, device=spec.get("device") or "cpu")
        return FaceTeacher(net, source=str(path))
    if ckpt:
        net, head, meta = load_face_checkpoint(ckpt)
        return FaceTeacher(net, head, meta.get("class_names"), source=str(ckpt))
    if spec.get("pretrained"):
        kwargs = dict(spec.get("kwargs") or {})
        net = build_embedding_model(spec["name"], int(kwargs.pop("embedding_size", 512)),
                                    pretrained=spec["pretrained"], **kwargs)
        return FaceTeacher(net.eval(), source=str(spec["pretrained"]))
    raise ConfigError("face distillation needs a teacher: set teacher.onnx=PATH|sface (an ONNX embedding model), "
                      "teacher.ckpt=PATH (a task=face run) or teacher.pretrained=WEIGHTS")


class FaceDistillationModule(DistillationMixin, FaceModule):
    """A face student trained on its own margin loss plus weighted distillers (kdx.distill) from a frozen teacher.

    Total = alpha * sum_m weight_m * loss_m + (1 - alpha) * margin. The distillers' trainable parts (a
    student -> teacher embedding projection, say) are trained and saved with the student, but are not part
    of the exported embedding network. Margin-head logits are offered to the distillers only when the
    teacher has a head trained on this run's identities (`shared_identities`).
    """

    def __init__(self, net: nn.Module, teacher: FaceTeacher, num_classes: int,
                 distill: DistillerSet | Mapping[str, Any] | None = None, alpha: float = 0.5,
                 save_teacher: bool = False, shared_identities: bool = False,
                 example_input: torch.Tensor | None = None, num_samples: int | None = None,
                 **face_kwargs: Any) -> None:
        super().__init__(net, num_classes, **face_kwargs)
        self.configure_distillation(teacher, distill if distill is not None else {"method": "emb_cos"}, alpha,
                                    save_teacher, task="face")
        self.offers_logits = teacher.head is not None and bool(shared_identities)
        provided = {"embedding", "labels", "indices"} | ({"logits"} if self.offers_logits else set())
        why = "the teacher has no margin head (an ONNX model or a bare network)" if teacher.head is None else \
            "the teacher's training identities differ from this run's"
        self.distillers.check_support(provided, "face distillation", why={
            "logits": f"{why}; logits need a teacher trained on the same identity set (teacher.ckpt of a task=face "
                      "run on this data)"})
        self.wants_logits = "logits" in self.distillers.needs
        if self.distill_alpha == 1.0 and not self.wants_logits:  # no margin loss: the head would get no gradient,
            self.head.requires_grad_(False)                      # which stalls DDP; keep it out of the optimizer
        self.attach_taps(net, None if teacher.is_onnx else teacher.net)
        if example_input is None:
            example_input = torch.zeros(2, int(self.model_meta.get("in_chans", 3)), *self.input_size)
        self.setup_distillers(example_input, self._student_outputs, self.teacher_outputs, num_samples, num_classes)

    def _student_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embed(x)
        return {"embedding": emb, "logits": self.head(emb)} if self.wants_logits else {"embedding": emb}

    def teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen teacher's outputs for `x`: its embedding, and its margin-head logits when a method reads them."""
        out = self.teacher_forward(x)
        return out if self.wants_logits else {"embedding": out["embedding"]}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, indices, views = split_batch(batch)
        db = self.distill_batch(x, y, indices, self._student_outputs, self.teacher_outputs, views)
        own = self.own_losses(db["student_embedding"], y)
        return self.log_terms(self.mix_losses(own, self.distillation_losses(db), hard_keys=("margin",)),
                              batch_size=y.shape[0])

# ---------------------------------------------------------------------- building from a config
def build_face_network(spec: Mapping[str, Any], in_chans: int, data_size: Sequence[int]) -> tuple[nn.Module, dict[str, Any]]:
    """A trainable embedding network from a model spec, and its `embedding_model` metadata."""
    from kdx.models.embedding import build_embedding_model

    if spec.get("onnx"):
        raise ConfigError(f"{spec.get('name') or 'this network'} is an ONNX model (onnx={spec['onnx']}) and cannot be "
                          "trained; train the student (task.network=student) or use a pair with a torch teacher")
    kwargs = dict(spec.get("kwargs") or {})
    embedding_size = int(kwargs.pop("embedding_size", 512))
    input_size = kwargs.pop("input_size", None) or list(data_size)
    if spec.get("ckpt"):  # start from a finished face run
        net, _, meta = load_face_checkpoint(spec["ckpt"])
        em = dict(meta["embedding_model"])
        return net, em
    net = build_embedding_model(spec["name"], embedding_size, in_chans=in_chans, pretrained=spec.get("pretrained") or False,
                                input_size=input_size, **kwargs)
    size = model_input_size(net)
    meta = {"name": spec["name"], "embedding_size": embedding_size, "in_chans": in_chans,
            "input_size": list(size), "kwargs": kwargs}
    return net, meta


def _probe_teacher(teacher: FaceTeacher, dm, spec: Mapping[str, Any]) -> torch.Tensor:
    """Run the teacher once on two images of the data (returned): a shape it cannot take is a ConfigError now."""
    dataset = dm.val_set if getattr(dm, "val_set", None) is not None else dm.train_set
    x = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))])
    try:
        with torch.no_grad():
            out = teacher(x)
    except KdxError as e:
        raise ConfigError(f"teacher {teacher.source} cannot take this data ({e})") from None
    except Exception as e:  # onnxruntime / torch shape errors
        where = "teacher.onnx" if spec.get("onnx") else "teacher"
        raise ConfigError(f"{where} {teacher.source} fails on the data's {tuple(x.shape[1:])} images "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); set teacher.preprocess.input_size "
                          f"(and channel_order) to the input the model was exported for") from None
    emb = out["embedding"]
    if emb.ndim != 2 or emb.shape[0] != x.shape[0]:
        raise ConfigError(f"teacher {teacher.source} returns shape {tuple(emb.shape)} for a batch of {x.shape[0]}; "
                          "an embedding teacher must return B x D")
    return x


def build_face_module(cfg, dm) -> tuple[FaceModule, dict[str, int]]:
    """The FaceModule (task=face) or FaceDistillationModule (task=face_distill) of a composed config."""
    task = cfg.task
    optim = to_dict(cfg.optim)
    if not hasattr(dm, "num_classes") or not hasattr(dm, "image_size"):
        raise ConfigError(f"task={task.name} needs a face datamodule (data=orl, face_folder or face_rec)")
    dm.setup("fit")
    data_size = tuple(dm.image_size) if not isinstance(dm.image_size, int) else (dm.image_size, dm.image_size)
    spec = to_dict(cfg[task.network])
    net, meta = build_face_network(spec, dm.in_chans, data_size)
    meta["class_names"] = list(getattr(dm, "class_names", []) or [])
    common = dict(margin=to_dict(task.get("margin")) or {}, optim=optim, model_meta=meta,
                  input_size=tuple(meta["input_size"]), flip_eval=bool(task.get("flip_eval", True)),
                  nrof_folds=int(task.get("nrof_folds", 10)),
                  far_targets=tuple(to_dict(task.get("far_targets")) or DEFAULT_FARS),
                  bn_recalibration_batches=int(task.get("bn_recalibration_batches", 0)))
    n_params = sum(p.numel() for p in net.parameters())
    if task.name == "face":
        return FaceModule(net, dm.num_classes, **common), {"network": n_params}
    distill = to_dict(cfg.distill)
    host = {k: distill.pop(k) for k in ("alpha", "save_teacher", "teacher_cache") if k in distill}
    distillers = build_distiller_set(distill, task="face")
    enable_sample_indices(dm, distillers)
    t_spec = to_dict(cfg.teacher)
    teacher = build_face_teacher(t_spec, data_mean=getattr(dm, "mean", 0.5), data_std=getattr(dm, "std", 0.5))
    example = _probe_teacher(teacher, dm, t_spec)
    shared = bool(teacher.class_names) and teacher.class_names == list(getattr(dm, "class_names", []) or [])
    module = FaceDistillationModule(
        net, teacher, dm.num_classes, distill=distillers, alpha=host.get("alpha", 0.5),
        save_teacher=bool(host.get("save_teacher", False)),
        shared_identities=shared, example_input=example, num_samples=len(dm.train_set), **common)
    apply_teacher_cache(module, dm, to_dict(cfg.data), host.get("teacher_cache"), int(cfg.seed),
                        cfg.trainer.get("max_epochs"), teacher_spec=t_spec,
                        teacher_file=str(teacher.net.path) if teacher.is_onnx else None)
    if teacher.is_onnx:
        from kdx.models.onnx_teacher import onnx_parameter_count

        t_params = onnx_parameter_count(teacher.net.path)
    else:
        t_params = sum(p.numel() for p in teacher.parameters())
    return module, {"network": n_params, "teacher": t_params}
