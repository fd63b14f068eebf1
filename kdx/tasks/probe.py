"""task=probe: a logistic-regression probe on the frozen teacher's penultimate features (or its logits)."""
from __future__ import annotations

from dataclasses import dataclass

from kdx.configs import to_dict
from kdx.errors import ConfigError
from kdx.lit import LinearProbeModule
from kdx.models import get_classifier
from kdx.schemas import choice
from kdx.tasks.base import Built, Task, count_parameters, register_task
from kdx.tasks.supervised import build_network, model_spec


@dataclass
class ProbeOptions:
    """`task.*` of the probe."""

    name: str = "probe"
    network: str = choice("teacher", "teacher", "student")
    probe_loss: str = choice("bce", "bce", "ce")  # bce: sigmoid + BCE one-vs-rest | ce: softmax + cross-entropy
    probe_inputs: str = choice("features", "features", "logits")  # penultimate features or the teacher's logits


@register_task
class ProbeTask(Task):
    """LinearProbeModule: Linear(features, classes) fitted on what the frozen teacher computes."""

    name = "probe"
    Options = ProbeOptions

    def check(self) -> None:
        super().check()
        teacher = model_spec(self.cfg, "teacher")
        if not teacher.ckpt and not teacher.pretrained:
            raise ConfigError("a probe needs a trained teacher: set teacher.ckpt=PATH or teacher.pretrained=true")

    def unread_sections(self) -> tuple[str, ...]:
        return ("distill",)

    def build(self, dm) -> Built:
        o = self.options
        teacher, _ = build_network(model_spec(self.cfg, "teacher"), dm.num_classes, dm.in_chans)
        num_features = get_classifier(teacher).in_features if o.probe_inputs == "features" else dm.num_classes
        module = LinearProbeModule(teacher, dm.num_classes, num_features, loss=o.probe_loss, inputs=o.probe_inputs,
                                   optim=to_dict(self.cfg.optim))
        return Built(module, {"network": count_parameters(module.head), "teacher": count_parameters(teacher)})
