"""Optimizers and per-step learning-rate schedules (linear warmup, then cosine or step decay)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from kdx.errors import ConfigError


def build_optimizer(param_groups: Iterable[dict[str, Any]], name: str = "sgd", lr: float = 0.1,
                    weight_decay: float = 5e-4, momentum: float = 0.9, nesterov: bool = True,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over parameter groups that may carry their own lr scale."""
    groups = []
    for g in param_groups:
        g = dict(g)
        g["lr"] = lr * g.pop("lr_scale", 1.0)
        groups.append(g)
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ConfigError(f"optim.name must be sgd, adamw or adam, got {name!r}")


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


def configure_optimization(module, param_groups, cfg: dict[str, Any]) -> dict[str, Any]:
    """What LightningModule.configure_optimizers returns for an `optim` config section."""
    cfg = dict(cfg)
    opt = build_optimizer(param_groups, name=cfg.get("name", "sgd"), lr=float(cfg.get("lr", 0.1)),
                          weight_decay=float(cfg.get("weight_decay", 5e-4)), momentum=float(cfg.get("momentum", 0.9)),
                          nesterov=bool(cfg.get("nesterov", True)), betas=tuple(cfg.get("betas", (0.9, 0.999))))
    total = max(1, int(module.trainer.estimated_stepping_batches))
    steps_per_epoch = total / max(1, module.trainer.max_epochs or 1)
    warmup = int(round(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch))
    kwargs = dict(total_steps=total, warmup_steps=warmup, schedule=cfg.get("schedule", "cosine"),
                  min_lr_ratio=float(cfg.get("min_lr_ratio", 0.0)), milestones=tuple(cfg.get("milestones", (0.5, 0.75))),
                  gamma=float(cfg.get("gamma", 0.1)))
    lr_factor(0, **kwargs)  # validates the schedule name before training starts
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, **kwargs))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
