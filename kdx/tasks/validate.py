"""`validate_config(cfg)`: every section of a composed kdx-train config checked against its schema, before any
work, each bad value told in one sentence that names its key.

- the top level, `checkpoint`, `teacher`/`student` and the kdx keys of `trainer` and `optim`: the dataclasses
  of kdx.schemas; `task`: the Options dataclass of its Task (kdx.tasks);
- `data`: the arguments of its `_target_` datamodule; `optim`'s other keys: the arguments of its optimizer
  class; `trainer`'s other keys: pl.Trainer's arguments; `distill`: each method's constructor
  (kdx.distill); all checked against their signatures;
- then the task's own checks (a teacher to distil from, data it can use).
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_class
from omegaconf import DictConfig

from kdx.configs import to_dict
from kdx.distill import distiller_class, split_distill_config
from kdx.distill.settings import split_distill_section
from kdx.errors import ConfigError
from kdx.lit.optim import optimizer_class
from kdx.schemas import (CheckpointOptions, ModelSpec, OptimOptions, RunOptions, TrainerOptions, check_arguments,
                         check_section, check_value, schema_fields)
from kdx.tasks.base import Task, task_for

# bounds of the data keys every kdx datamodule takes (their types come from the datamodule's signature)
DATA_BOUNDS = {"batch_size": (1, None, False, False), "eval_batch_size": (1, None, False, False),
               "num_workers": (0, None, False, False)}
SECTIONS = ("data", "pair", "task", "distill", "optim", "trainer", "logger", "checkpoint", "teacher", "student")


def _split(values: dict[str, Any], schema: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keys `schema` declares, the others) of a section."""
    fields = schema_fields(schema)
    return {k: v for k, v in values.items() if k in fields}, {k: v for k, v in values.items() if k not in fields}


def check_trainer(trainer: dict[str, Any]) -> None:
    """kdx's own `trainer` keys against TrainerOptions, the rest against pl.Trainer's arguments."""
    own, rest = _split(trainer, TrainerOptions)
    check_section(own, TrainerOptions, "trainer")
    check_arguments(rest, pl.Trainer, "trainer", "pl.Trainer (trainer.* keys are its arguments)")
    max_steps = rest.get("max_steps")
    by_steps = isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0
    if "max_epochs" in rest:
        check_value("trainer.max_epochs", rest["max_epochs"], int, bounds=(1, None, False, False),
                    allowed=(-1,) if by_steps else (), hint="a run needs at least one epoch")
    if "max_steps" in rest:
        check_value("trainer.max_steps", max_steps, int, bounds=(1, None, False, False), allowed=(-1,))


def check_optim(optim: dict[str, Any]) -> None:
    """kdx's `optim` keys against OptimOptions, the rest against the optimizer class's arguments."""
    own, rest = _split(optim, OptimOptions)
    check_section(own, OptimOptions, "optim")
    cls = optimizer_class(own.get("_target_"))
    check_arguments(rest, cls, "optim", f"{own.get('_target_') or cls.__name__} (optim.* keys are its arguments)",
                    reserved=("params",))
    if "momentum" in rest:
        check_value("optim.momentum", rest["momentum"], float, bounds=(0, 1, False, True))


def check_data(data: dict[str, Any]) -> None:
    """The `data` keys against the arguments of the datamodule `data._target_` names."""
    target = data.get("_target_")
    if not target:
        raise ConfigError("data._target_ is not set; pick a data config (data=fmnist, ...) or name a datamodule class")
    try:
        cls = get_class(str(target))
    except Exception as e:
        raise ConfigError(f"data._target_={target!r} is not an importable class ({str(e).splitlines()[0]})") from None
    check_arguments(data, cls, "data", f"the datamodule {target}", ignore=("_target_", "name"))
    for key, bounds in DATA_BOUNDS.items():
        if data.get(key) is not None:
            check_value(f"data.{key}", data[key], int, bounds=bounds)


def check_distill(distill: dict[str, Any], kind: str = "classification") -> None:
    """The host's `distill` keys (kdx.distill.settings), and each method's parameters against its constructor."""
    split_distill_section(distill, kind)
    for name, weight, params, key in split_distill_config(distill):
        check_arguments(params, distiller_class(name, key=f"{key}.method" if key == "distill" else key), key,
                        f"distillation method {name!r}")
        if "temperature" in params:
            check_value(f"{key}.temperature", params["temperature"], float, bounds=(0, None, True, False))


def validate_config(cfg: DictConfig) -> Task:
    """Check every section of a composed kdx-train config (see the module docstring); return its Task."""
    if "pipeline" in cfg and cfg.get("pipeline") is not None:
        raise ConfigError("this experiment describes a pipeline; run it with kdx-pipeline, not kdx-train")
    top = {k: v for k, v in to_dict(cfg).items() if k not in SECTIONS and k != "hydra"}
    check_section({k: v for k, v in top.items() if k in schema_fields(RunOptions)}, RunOptions, "")
    task = task_for(cfg)
    check_section(to_dict(cfg.get("checkpoint")) or {}, CheckpointOptions, "checkpoint")
    for network in ("teacher", "student"):
        check_section(to_dict(cfg.get(network)) or {}, ModelSpec, network)
    check_trainer(to_dict(cfg.trainer) or {})
    check_optim(to_dict(cfg.optim) or {})
    check_data(to_dict(cfg.data) or {})
    if task.distills:
        check_distill(to_dict(cfg.distill) or {}, task.kind)
    task.check()
    return task
