"""task=supervised: cross-entropy training of one network of the pair (`task.network`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdx.checkpoints import load_network
from kdx.configs import to_dict
from kdx.data.transforms import input_normalization
from kdx.errors import ConfigError
from kdx.lit import ClassifierModule
from kdx.models import build_model
from kdx.schemas import ModelSpec, check_section, choice, number
from kdx.tasks.base import Built, Task, count_parameters, register_task


@dataclass
class ClassifierOptions:
    """`task.*` of the classification tasks that train one classifier (supervised, transfer, distill)."""

    name: str = "supervised"
    network: str = choice("teacher", "teacher", "student")  # which network of the pair is trained
    label_smoothing: float = number(0.0, 0, 1, high_open=True)
    freeze_backbone: bool = False        # true: train only the classifier
    backbone_lr_scale: float = number(1.0, 0)  # backbone learning rate = optim.lr * this
    l2sp_weight: float = number(0.0, 0)  # > 0 pulls the backbone towards its starting weights (L2-SP)


def model_spec(cfg, network: str) -> ModelSpec:
    """The `teacher` or `student` section of a config, checked against ModelSpec."""
    return check_section(to_dict(cfg[network]), ModelSpec, network)


def build_network(spec: ModelSpec, num_classes: int, in_chans: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A classifier from a model spec, with the metadata that rebuilds it from a checkpoint later."""
    if spec.ckpt:
        net, meta = load_network(spec.ckpt, num_classes=num_classes, model_name=spec.name)
        return net, {k: meta[k] for k in ("model_name", "in_chans", "model_kwargs") if k in meta}
    if not spec.name:
        raise ConfigError("a network needs a name or a checkpoint: set teacher.name / student.name (or .ckpt)")
    kwargs = dict(spec.kwargs or {})
    net = build_model(spec.name, num_classes=num_classes, in_chans=in_chans, pretrained=spec.pretrained or False,
                      **kwargs)
    return net, {"model_name": spec.name, "in_chans": in_chans, "model_kwargs": kwargs}


@register_task
class SupervisedTask(Task):
    """One classifier trained on the labels (ClassifierModule)."""

    name = "supervised"
    Options = ClassifierOptions
    learns_from_mixed = True

    def classifier_kwargs(self, meta: dict[str, Any]) -> dict[str, Any]:
        """ClassifierModule's arguments from the task options and the optim section."""
        o = self.options
        return dict(optim=to_dict(self.cfg.optim), label_smoothing=o.label_smoothing, model_meta=meta,
                    freeze_backbone=o.freeze_backbone, backbone_lr_scale=o.backbone_lr_scale, l2sp_weight=o.l2sp_weight)

    def trained_network(self, dm) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The network `task.network` names, and its checkpoint metadata (classes, image size)."""
        net, meta = build_network(model_spec(self.cfg, self.options.network), dm.num_classes, dm.in_chans)
        meta.update(class_names=list(dm.class_names), image_size=dm.image_size,
                    normalization=input_normalization(dm))  # what an export states its input to be
        return net, meta

    def build(self, dm) -> Built:
        net, meta = self.trained_network(dm)
        module = ClassifierModule(net, dm.num_classes, **self.classifier_kwargs(meta))
        return Built(module, {"network": count_parameters(net)})
