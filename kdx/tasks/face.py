"""task=face: an embedding network trained with a margin softmax over the training identities, scored by face
verification on held-out identities."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from torch import nn

from kdx.checkpoints import load_face_checkpoint
from kdx.configs import as_hw, to_dict
from kdx.errors import ConfigError
from kdx.lit import FaceModule
from kdx.models import build_embedding_model, model_input_size
from kdx.schemas import ModelSpec, choice, number
from kdx.tasks.base import Built, Task, count_parameters, register_task
from kdx.tasks.supervised import model_spec


@dataclass
class MarginOptions:
    """`task.margin`: the margin-softmax head (kdx.models.margin_heads)."""

    kind: str = choice("arcface", "arcface", "cosface", "normsoftmax")
    s: float = number(64.0, 0, low_open=True)  # logit scale
    m1: Optional[float] = None           # overrides of the preset: multiplicative angular (SphereFace),
    m2: Optional[float] = None           # additive angular (ArcFace),
    m3: Optional[float] = None           # additive cosine (CosFace) margin
    easy_margin: bool = False


@dataclass
class FaceOptions:
    """`task.*` of face training."""

    name: str = "face"
    network: str = choice("student", "teacher", "student")
    margin: MarginOptions = field(default_factory=MarginOptions)
    flip_eval: bool = True               # add the embedding of the horizontally flipped image (insightface protocol)
    nrof_folds: int = number(10, 2)      # folds of the verification accuracy
    far_targets: List[float] = field(default_factory=lambda: [0.1, 0.01, 0.001])
    bn_recalibration_batches: int = number(0, 0)  # precise BN over this many training batches before validation


def build_face_network(spec: ModelSpec, in_chans: int, data_size: Sequence[int]) -> tuple[nn.Module, dict[str, Any]]:
    """A trainable embedding network from a model spec, and its `embedding_model` metadata."""
    if spec.onnx:
        raise ConfigError(f"{spec.name or 'this network'} is an ONNX model (onnx={spec.onnx}) and cannot be "
                          "trained; train the student (task.network=student) or use a pair with a torch teacher")
    if spec.ckpt:  # start from a finished face run
        net, _, meta = load_face_checkpoint(spec.ckpt, spec.name)
        return net, dict(meta["embedding_model"])
    kwargs = dict(spec.kwargs or {})
    embedding_size = int(kwargs.pop("embedding_size", 512))
    input_size = kwargs.pop("input_size", None) or list(data_size)
    net = build_embedding_model(spec.name, embedding_size, in_chans=in_chans, pretrained=spec.pretrained or False,
                                input_size=input_size, **kwargs)
    meta = {"name": spec.name, "embedding_size": embedding_size, "in_chans": in_chans,
            "input_size": list(model_input_size(net)), "kwargs": kwargs}
    return net, meta


@register_task
class FaceTask(Task):
    """FaceModule: margin softmax on the training identities, verification on held-out ones."""

    name = "face"
    Options = FaceOptions
    kind = "face"

    def face_network(self, dm) -> tuple[nn.Module, dict[str, Any]]:
        """The trained network (`task.network`) and its metadata, for the face datamodule `dm`."""
        if not hasattr(dm, "num_classes") or not hasattr(dm, "image_size"):
            raise ConfigError(f"task={self.name} needs a face datamodule (data=orl, face_folder or face_rec)")
        dm.setup("fit")
        net, meta = build_face_network(model_spec(self.cfg, self.options.network), dm.in_chans, as_hw(dm.image_size))
        meta["class_names"] = list(getattr(dm, "class_names", []) or [])
        return net, meta

    def face_kwargs(self, meta: dict[str, Any]) -> dict[str, Any]:
        """FaceModule's arguments from the task options and the optim section."""
        o = self.options
        return dict(margin={k: v for k, v in vars(o.margin).items()}, optim=to_dict(self.cfg.optim), model_meta=meta,
                    input_size=tuple(meta["input_size"]), flip_eval=o.flip_eval, nrof_folds=o.nrof_folds,
                    far_targets=tuple(o.far_targets), bn_recalibration_batches=o.bn_recalibration_batches)

    def build(self, dm) -> Built:
        net, meta = self.face_network(dm)
        return Built(FaceModule(net, dm.num_classes, **self.face_kwargs(meta)), {"network": count_parameters(net)})
