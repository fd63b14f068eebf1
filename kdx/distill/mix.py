"""Several distillers with weights, built from the `distill` config section, run as one module."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from kdx.data.base import KdxDataModule
from kdx.distill.base import Distiller, DistillBatch, build_distiller, distiller_class
from kdx.distill.settings import DEFAULT_WEIGHT, NOT_PARAMETERS
from kdx.errors import ConfigError

# `distill.*` keys that are no parameter of `distill.method` (the host's and method/weight/mix); every other is one
HOST_KEYS = NOT_PARAMETERS


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


class DistillerSet(nn.Module):
    """Named distillers and their weights; `losses(batch)` returns every method's weighted terms by name."""

    def __init__(self, entries: Sequence[tuple[str, float, Distiller]]) -> None:
        super().__init__()
        if not entries:
            raise ConfigError("distill.method is empty; name a method (e.g. distill=kd), see `kdx-train --help`")
        self.methods = nn.ModuleDict({name: d for name, _, d in entries})
        self.weights = {name: float(w) for name, w, _ in entries}

    @property
    def needs(self) -> set[str]:
        """Union of what the methods read (logits, embedding, indices, labels)."""
        return set().union(*(d.needs for d in self.methods.values()))

    def student_layers(self) -> list[str]:
        """Student module paths any method reads, in first-use order."""
        return list(dict.fromkeys(p for d in self.methods.values() for p in d.student_layers()))

    def teacher_layers(self) -> list[str]:
        """Teacher module paths any method reads, in first-use order."""
        return list(dict.fromkeys(p for d in self.methods.values() for p in d.teacher_layers()))

    def check_support(self, provided: Iterable[str], host: str, why: Mapping[str, str] | None = None) -> None:
        """A ConfigError when a method reads an output the host cannot give (sample indices, teacher logits...)."""
        provided = set(provided)
        for name, d in self.methods.items():
            missing = sorted(set(d.needs) - provided)
            if missing:
                reason = "; ".join((why or {}).get(m, f"{host} gives no {m}") for m in missing)
                raise ConfigError(f"distillation method {name!r} needs {', '.join(missing)}, but {reason}")

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Show every method the two networks (so it can resolve its default layers)."""
        for d in self.methods.values():
            d.bind(student, teacher)

    def setup(self, probe: DistillBatch, num_samples: int | None = None) -> None:
        """Let every method build its trainable parts from the probe batch's shapes."""
        for d in self.methods.values():
            d.setup(probe, num_samples=num_samples)

    def raw_terms(self, batch: DistillBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Every method's raw loss terms by name (methods whose weight is 0 are skipped), and the weight of the
        method each term comes from; `weigh_losses` is what combines them."""
        raw: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for name, d in self.methods.items():
            weight = self.weights[name]
            if weight == 0:
                continue
            for term, value in d(batch).items():
                if term in raw:
                    raise ConfigError(f"distillation methods return the loss term {term!r} twice; mix each method once")
                raw[term], weights[term] = value, weight
        return raw, weights

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        """Each method's loss terms times its weight, by term name."""
        raw, weights = self.raw_terms(batch)
        return {term: weights[term] * value for term, value in raw.items()}


def weigh_losses(own: Mapping[str, torch.Tensor], raw: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                 alpha: float, hard_keys: Sequence[str] = ("ce",)) -> dict[str, torch.Tensor]:
    """The one place losses are weighed: the student's hard-label terms (`hard_keys`) times (1 - alpha), its other
    own terms (regularisers) as they are, and each distillation term times alpha times its method's weight.

    Total = (1 - alpha) * hard + alpha * sum_m weight_m * loss_m (+ regularisers); a hard term whose scale is 0
    is left out. A distillation term named like an own term is a ConfigError.
    """
    scale = 1.0 - alpha
    mixed = {k: (v * scale if k in hard_keys else v) for k, v in own.items() if not (k in hard_keys and scale == 0)}
    clash = set(mixed) & set(raw)
    if clash:
        raise ConfigError(f"distillation terms {sorted(clash)} clash with the student's own loss terms")
    return {**mixed, **{term: alpha * (weights[term] * value) for term, value in raw.items()}}


def split_distill_config(cfg: Mapping[str, Any]) -> list[tuple[str, float, dict[str, Any], str]]:
    """(method, weight, parameters, config key) for `distill.method` and each entry of `distill.mix`."""
    cfg = dict(cfg)
    entries = []
    method = cfg.get("method")
    if method:
        params = {k: v for k, v in cfg.items() if k not in HOST_KEYS}
        entries.append((str(method), _number(cfg.get("weight", DEFAULT_WEIGHT), "distill.weight"), params, "distill"))
    else:
        stray = sorted(k for k in cfg if k not in HOST_KEYS)
        if stray:
            raise ConfigError(f"distill.{stray[0]} is set but distill.method is empty; choose a method (distill=kd)")
    for name, spec in dict(cfg.get("mix") or {}).items():
        key = f"distill.mix.{name}"
        spec = dict(spec or {}) if isinstance(spec, Mapping) else {"weight": spec}
        distiller_class(str(name), key=key)
        if name == method:
            raise ConfigError(f"{key} repeats distill.method={method!r}; set its weight with distill.weight")
        weight = _number(spec.pop("weight", DEFAULT_WEIGHT), f"{key}.weight")
        entries.append((str(name), weight, spec, key))
    return entries


def build_distiller_set(cfg: Mapping[str, Any], task: str = "classification") -> DistillerSet:
    """The DistillerSet of a `distill` config section; methods of another task are refused by name."""
    built = []
    entries = split_distill_config(cfg)
    if entries and all(weight == 0 for _, weight, _, _ in entries):
        raise ConfigError("every distillation method has weight 0; give one a weight > 0 (distill.weight=1), or train "
                          "the student alone (task=supervised)")
    for name, weight, params, key in entries:
        if weight == 0:  # left out entirely: unused parameters would stall DDP's gradient synchronisation
            continue
        cls = distiller_class(name, key=f"{key}.method" if key == "distill" else key)
        if task not in cls.tasks:
            raise ConfigError(f"distillation method {name!r} is for {', '.join(sorted(cls.tasks))} tasks, not {task}; "
                              f"choose another distill.method")
        built.append((cls.name, weight, build_distiller(name, params, key=key)))
    return DistillerSet(built)


def require_sample_indices(dm: Any, distillers: DistillerSet) -> None:
    """A ConfigError when a method keeps per-sample state (CRD) but the datamodule's batches name no sample.

    kdx datamodules (kdx.data.KdxDataModule) always give each training sample's index (kdx.data.batch).
    """
    if "indices" not in distillers.needs or isinstance(dm, KdxDataModule):
        return
    users = [n for n, d in distillers.methods.items() if "indices" in d.needs]
    raise ConfigError(f"distillation method {users[0]!r} needs sample indices, but {type(dm).__name__} gives none; "
                      "use a kdx datamodule (kdx.data.KdxDataModule) or another method")
