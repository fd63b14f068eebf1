"""Tasks: what a training run trains, each one registered class (`task=<name>`) with a dataclass of its keys.

    supervised  one network of the pair on the labels          transfer      a pretrained backbone, new classes
    distill     the student from a frozen teacher (kdx.distill) probe         a linear probe on the frozen teacher
    face        an embedding net, margin softmax, verification  face_distill  a face student from a face teacher

`validate_config(cfg)` checks a composed config against the schemas and returns its Task;
`task.create(dm)` builds the LightningModule for the set-up datamodule.
"""
from kdx.tasks.base import (Built, Task, available_tasks, count_parameters, example_images, register_task,
                            task_class, task_for)
from kdx.tasks.supervised import ClassifierOptions, SupervisedTask, build_network, model_spec
from kdx.tasks.transfer import TransferTask
from kdx.tasks.distill import DistillTask
from kdx.tasks.probe import ProbeTask
from kdx.tasks.face import FaceTask, build_face_network
from kdx.tasks.face_distill import FaceDistillTask, probe_teacher
from kdx.tasks.validate import validate_config

__all__ = [
    "Built", "ClassifierOptions", "DistillTask", "FaceDistillTask", "FaceTask", "ProbeTask", "SupervisedTask", "Task",
    "TransferTask", "available_tasks", "build_face_network", "build_network", "count_parameters", "example_images",
    "model_spec", "probe_teacher", "register_task", "task_class", "task_for", "validate_config",
]
