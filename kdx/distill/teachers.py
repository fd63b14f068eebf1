"""Frozen face teachers: an embedding network (torch or ONNX) and, for a kdx face checkpoint, its margin head,
built from a teacher spec (`teacher.onnx`, `teacher.ckpt` or `teacher.name` + `teacher.pretrained`); and the
identity-centroid head (`teacher.head=centroids`), which gives any embedding teacher logits over this run's
identities."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdx.checkpoints import load_face_checkpoint
from kdx.errors import ConfigError
from kdx.models.margin_heads import CombinedMarginHead
from kdx.models import build_embedding_model, fit_input, model_input_size
from kdx.models.onnx_teacher import OnnxEmbeddingModel, recorded_normalization, sface_model_path

PREPROCESS_KEYS = ("input_size", "channel_order", "value_range", "mean", "std", "convert_channels")
TEACHER_HEADS = ("centroids",)  # teacher.head: how a face teacher gets logits over this run's identities


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


def onnx_input_scaling(path: Path, pre: Mapping[str, Any]) -> tuple[tuple[float, float], Any, Any]:
    """(value range, mean, std) an ONNX teacher's input is brought to: `teacher.preprocess` where it sets any of
    them; else the normalisation a kdx export's description `<model>.json` records (x/255, then mean/std); else raw
    0..255 values, as external models such as SFace take them. teacher.preprocess that contradicts a recorded
    normalisation is followed, with a warning naming both."""
    recorded, side = recorded_normalization(path)
    given = {k: pre.get(k) for k in ("value_range", "mean", "std") if pre.get(k) is not None}
    if not given:
        if recorded is not None:
            return (0.0, 1.0), recorded["mean"], recorded["std"]
        return (0.0, 255.0), None, None
    value_range = tuple(float(v) for v in given.get("value_range", (0.0, 255.0)))
    if recorded is not None and (value_range != (0.0, 1.0) or _as_list(given.get("mean")) != _as_list(recorded["mean"])
                                 or _as_list(given.get("std")) != _as_list(recorded["std"])):
        warnings.warn(f"teacher.preprocess ({', '.join(f'{k}={v}' for k, v in given.items())}) differs from the input "
                      f"normalisation {side} records ((x/255 - {recorded['mean']}) / {recorded['std']}); kdx follows "
                      f"teacher.preprocess, so drop those keys if the model is that export", stacklevel=2)
    return value_range, given.get("mean"), given.get("std")


def _as_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values[:1] if len(set(values)) == 1 else values  # 0.5 and [0.5, 0.5, 0.5] say the same


def build_face_teacher(spec: Mapping[str, Any], data_mean: Any = 0.5, data_std: Any = 0.5) -> FaceTeacher:
    """The frozen teacher of a model spec: `onnx` (a path or `sface`), `ckpt` (a face run) or `name`+`pretrained`."""
    onnx, ckpt = spec.get("onnx"), spec.get("ckpt")
    if onnx and ckpt:
        raise ConfigError(f"teacher.onnx={onnx} and teacher.ckpt={ckpt} are both set; keep one (teacher.onnx=null "
                          "to distil from the checkpoint)")
    if onnx:
        path = sface_model_path() if str(onnx).lower() == "sface" else Path(str(onnx)).expanduser()
        pre = dict(spec.get("preprocess") or {})
        unknown = set(pre) - set(PREPROCESS_KEYS)
        if unknown:
            raise ConfigError(f"teacher.preprocess has unknown keys {sorted(unknown)}; use {', '.join(PREPROCESS_KEYS)}")
        value_range, mean, std = onnx_input_scaling(path, pre)
        net = OnnxEmbeddingModel(path, input_size=pre.get("input_size"), channel_order=pre.get("channel_order") or "RGB",
                                 value_range=value_range, mean=mean, std=std,
                                 convert_channels=bool(pre.get("convert_channels", True)),
                                 input_mean=data_mean, input_std=data_std, device=spec.get("device") or "cpu")
        return FaceTeacher(net, source=str(path))
    if ckpt:
        net, head, meta = load_face_checkpoint(ckpt, spec.get("name"))
        return FaceTeacher(net, head, meta.get("class_names"), source=str(ckpt))
    if spec.get("pretrained"):
        kwargs = dict(spec.get("kwargs") or {})
        net = build_embedding_model(spec["name"], int(kwargs.pop("embedding_size", 512)),
                                    pretrained=spec["pretrained"], **kwargs)
        return FaceTeacher(net.eval(), source=str(spec["pretrained"]))
    raise ConfigError("face distillation needs a teacher: set teacher.onnx=PATH|sface (an ONNX embedding model), "
                      "teacher.ckpt=PATH (a task=face run) or teacher.pretrained=WEIGHTS")


def check_teacher_head(head: str | None) -> None:
    """A `teacher.head` kdx cannot build is a ConfigError naming it (null: the teacher's own head, if any)."""
    if head and head not in TEACHER_HEADS:
        raise ConfigError(f"teacher.head={head} is not a head kdx builds; use teacher.head=centroids (a cosine head "
                          "over this run's identities) or leave it null")


@torch.no_grad()
def centroid_head(teacher: FaceTeacher, dataset: Dataset, num_classes: int, scale: float,
                  batch_size: int = 64) -> CombinedMarginHead:
    """A cosine head over `num_classes` identities whose class weights are the teacher's identity centroids: the
    mean of each identity's unit-length teacher embeddings over `dataset` ((image, label) pairs, best without
    augmentation), itself scaled to unit length. Its logits are `scale` * cos(embedding, centroid), the scaled
    cosines a margin head trained on these identities gives at evaluation (its class weights converge towards the
    same centres), so logit distillation (logit_kd) can read a teacher that was never trained on them, an ONNX
    model such as SFace included. No margin is applied: the head is only read, never trained.
    """
    sums, counts = None, torch.zeros(num_classes, dtype=torch.long)
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        emb = F.normalize(teacher(images)["embedding"].double())
        labels = torch.as_tensor(labels).long().view(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ConfigError(f"teacher.head=centroids: the training set has label {int(labels.max())} outside the "
                              f"{num_classes} identities; the data's labels must be 0..{num_classes - 1}")
        if sums is None:
            sums = torch.zeros(num_classes, emb.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels, emb)
        counts += torch.bincount(labels, minlength=num_classes)
    missing = (counts == 0).nonzero().view(-1).tolist()
    if sums is None or missing:
        raise ConfigError(f"teacher.head=centroids needs a training image of every identity, but {len(missing)} of "
                          f"{num_classes} have none (labels {missing[:5]}{'...' if len(missing) > 5 else ''}); "
                          "drop the empty identities from the data")
    head = CombinedMarginHead(sums.shape[1], num_classes, s=scale, m1=1.0, m2=0.0, m3=0.0)
    head.weight.data.copy_(F.normalize(sums).float())
    return head.requires_grad_(False).eval()


def with_centroid_head(teacher: FaceTeacher, head: str, dataset: Dataset, class_names: Sequence[str],
                       scale: float, batch_size: int = 64) -> FaceTeacher:
    """`teacher` answering with logits over `class_names` from its identity-centroid head (`teacher.head=head`,
    which must be `centroids`), computed once over `dataset`; a head it already had is replaced."""
    check_teacher_head(head)
    fitted = centroid_head(teacher, dataset, len(class_names), scale, batch_size)
    return FaceTeacher(teacher.net, fitted, class_names, input_size=teacher.input_size, source=teacher.source)
