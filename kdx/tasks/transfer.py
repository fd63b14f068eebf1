"""task=transfer: fine-tune a pretrained backbone on new classes (a new classifier, a smaller backbone learning
rate, optionally L2-SP towards the pretrained weights)."""
from __future__ import annotations

from dataclasses import dataclass

from kdx.schemas import choice, number
from kdx.tasks.base import register_task
from kdx.tasks.supervised import ClassifierOptions, SupervisedTask


@dataclass
class TransferOptions(ClassifierOptions):
    """`task.*` of transfer learning: the student by default, its backbone at a tenth of the learning rate."""

    name: str = "transfer"
    network: str = choice("student", "teacher", "student")
    backbone_lr_scale: float = number(0.1, 0)


@register_task
class TransferTask(SupervisedTask):
    """ClassifierModule on a pretrained network whose classifier was replaced for the data's classes."""

    name = "transfer"
    Options = TransferOptions
