"""Optimizers from the `optim` config (`_target_`: any torch.optim class, or an import path of one's own) and
kdx's per-step learning-rate schedule (linear warmup, then cosine, step or constant)."""
from __future__ import annotations

import inspect
import math
from typing import Any, Iterable, Mapping

import torch
from hydra.utils import get_class

from kdx.errors import ConfigError

DEFAULT_OPTIMIZER = "torch.optim.SGD"
# `optim.*` keys kdx reads itself (the schedule); every other key is an argument of the optimizer class
SCHEDULE_KEYS = ("schedule", "warmup_epochs", "min_lr_ratio", "milestones", "gamma")


def optimizer_class(target: str | None) -> type[torch.optim.Optimizer]:
    """The optimizer class `optim._target_` names, or a ConfigError."""
    target = target or DEFAULT_OPTIMIZER
    try:
        cls = get_class(target)
    except Exception as e:
        raise ConfigError(f"optim._target_={target!r} is not an importable class ({str(e).splitlines()[0]}); "
                          f"name a torch.optim class, e.g. torch.optim.AdamW") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optim._target_={target!r} is not a torch.optim.Optimizer")
    return cls


def optimizer_arguments(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of an `optim` section that go to the optimizer class (all but _target_ and the schedule)."""
    return {k: v for k, v in cfg.items() if k != "_target_" and k not in SCHEDULE_KEYS}


def build_optimizer(param_groups: Iterable[dict[str, Any]], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of an `optim` section over parameter groups, which may carry an `lr_scale` of their own."""
    cls = optimizer_class(cfg.get("_target_"))
    kwargs = optimizer_arguments(cfg)
    lr = float(kwargs.get("lr", inspect.signature(cls).parameters["lr"].default))
    groups = []
    for g in param_groups:
        g = dict(g)
        g["lr"] = lr * g.pop("lr_scale", 1.0)
        groups.append(g)
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optim: {cls.__module__}.{cls.__name__} refuses these arguments ({e}); check the optim "
                          f"keys") from None


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0, milestones: Iterable[float] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """Multiplier of the base lr at `step`: linear warmup, then `cosine`, `step` (at fractions of training) or `constant`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(progress >= m for m in milestones)
    raise ConfigError(f"optim.schedule must be cosine, step or constant, got {schedule!r}")


def configure_optimization(module, param_groups, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What LightningModule.configure_optimizers returns for an `optim` config section."""
    cfg = dict(cfg)
    opt = build_optimizer(param_groups, cfg)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    steps_per_epoch = total / max(1, module.trainer.max_epochs or 1)
    warmup = int(round(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch))
    kwargs = dict(total_steps=total, warmup_steps=warmup, schedule=cfg.get("schedule", "cosine"),
                  min_lr_ratio=float(cfg.get("min_lr_ratio", 0.0)), milestones=tuple(cfg.get("milestones", (0.5, 0.75))),
                  gamma=float(cfg.get("gamma", 0.1)))
    lr_factor(0, **kwargs)  # validates the schedule name before training starts
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, **kwargs))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
