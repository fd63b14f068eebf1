"""The Distiller contract and the registry that finds distillers by name.

A Distiller is an `nn.Module` that turns one training batch, seen by student and teacher, into named
losses. It declares what it reads, so the host computes only that:

- `needs`: which outputs it reads, from {"logits", "embedding", "indices", "labels"};
- `student_layers()` / `teacher_layers()`: module paths whose outputs it reads (taken with forward hooks),
  which `bind(student, teacher)` may pick from the networks' declared stages;
- its trainable parts (connectors, regressors, memory banks) are ordinary submodules, built in `setup()`
  from the shapes of one probe batch, before the optimizer exists;
- its hyper-parameters are its constructor's keyword arguments (what `distill.<key>=` sets).

The batch a distiller receives is a dict (see `DistillBatch`): `images`, `labels`, `indices`, `epoch`,
`max_epochs`, `student_logits`, `teacher_logits`, `student_embedding`, `teacher_embedding`,
`student_features` and `teacher_features` (dicts from module path to tensor). Teacher tensors carry no graph.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, ClassVar, Mapping, TypedDict

import torch
from torch import nn

from kdx.errors import ConfigError

OUTPUTS = ("logits", "embedding", "indices", "labels")


class DistillBatch(TypedDict, total=False):
    """What a distiller sees of one training step."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    epoch: int
    max_epochs: int
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    student_embedding: torch.Tensor
    teacher_embedding: torch.Tensor
    student_features: dict[str, torch.Tensor]
    teacher_features: dict[str, torch.Tensor]


class Distiller(nn.Module):
    """Base class of every distillation method; subclasses set `name`, `needs` and implement `forward`."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "face"})
    paper: ClassVar[str] = ""

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once with both networks (teacher None for an ONNX model) before the layers are asked for:
        a method resolves its default layers here (see kdx.distill.stages)."""

    def student_layers(self) -> list[str]:
        """Module paths of the student whose outputs this method reads."""
        return []

    def teacher_layers(self) -> list[str]:
        """Module paths of the teacher whose outputs this method reads."""
        return []

    def setup(self, probe: DistillBatch, num_samples: int | None = None) -> None:
        """Build trainable parts from one probe batch's shapes (called once, before the optimizer is made)."""

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments this instance was built with."""
        return dict(getattr(self, "_kdx_hparams", {}))


_REGISTRY: dict[str, type[Distiller]] = {}


def register_distiller(cls: type[Distiller] | None = None) -> type[Distiller]:
    """Class decorator, used bare (`@register_distiller` on a Distiller subclass): make `cls` buildable by its
    `name` (`distill.method=<name>`). The name is the class's `name`, so the decorator takes no arguments."""
    if not (isinstance(cls, type) and issubclass(cls, Distiller)):
        raise TypeError(f"@register_distiller takes no arguments and decorates a Distiller subclass (got "
                        f"{cls!r}); set the method's name as the class attribute `name`")
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`: give the class the name its presets use, e.g. "
                         f"`name = \"{cls.__name__.lower()}\"` under `class {cls.__name__}(Distiller):`; "
                         f"@register_distiller registers the method under it (distill.method=<name>)")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"distiller name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    unknown = set(cls.needs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"{cls.__name__}.needs has unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
    _REGISTRY[cls.name] = cls
    return cls


def available_distillers(task: str | None = None) -> list[str]:
    """Registered method names (for one task when `task` is given), sorted."""
    return sorted(n for n, c in _REGISTRY.items() if task is None or task in c.tasks)


def distiller_class(name: str, key: str = "distill.method") -> type[Distiller]:
    """The registered class of `name`, or a ConfigError that lists the known methods.

    A dotted name (`my_project.distillers.MyMethod` or `my_project.distillers:my_method`) imports that module
    first, so a method of one's own needs no change to kdx: one file (on the Python path) plus one YAML.
    """
    if name not in _REGISTRY and ("." in str(name) or ":" in str(name)):
        return _import_distiller(str(name), key)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{key}={name!r} is not a known distillation method{hint}; "
                          f"known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def distiller_parameters(cls: type[Distiller]) -> dict[str, Any]:
    """Constructor keyword arguments of `cls` and their defaults."""
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_distiller(name: str, params: Mapping[str, Any] | None = None, key: str = "distill") -> Distiller:
    """Instantiate method `name` with `params`; an unknown parameter is a ConfigError naming `key.<param>`."""
    cls = distiller_class(name, key=f"{key}.method" if key == "distill" else key)
    params = dict(params or {})
    allowed = distiller_parameters(cls)
    for p in params:
        if p not in allowed:
            close = difflib.get_close_matches(p, list(allowed), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            known = ", ".join(allowed) or "none"
            raise ConfigError(f"{key}.{p} is not a parameter of distillation method {name!r}{hint}; "
                              f"its parameters: {known}")
    missing = [p for p, d in allowed.items() if d is inspect.Parameter.empty and p not in params]
    if missing:
        raise ConfigError(f"distillation method {name!r} needs {', '.join(f'{key}.{m}' for m in missing)}; "
                          f"set {'them' if len(missing) > 1 else 'it'} in the config or on the command line")
    distiller = cls(**params)
    distiller._kdx_hparams = {**{k: v for k, v in allowed.items() if v is not inspect.Parameter.empty}, **params}
    return distiller


def _import_distiller(spec: str, key: str) -> type[Distiller]:
    """The Distiller a `module.Class` or `module:registered_name` spec points at, importing its module."""
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} cannot be imported ({e}); check the name and "
                          "that its folder is on PYTHONPATH") from None
    found = _REGISTRY.get(attr) or getattr(module, attr, None)
    if not (isinstance(found, type) and issubclass(found, Distiller)):
        raise ConfigError(f"{key}={spec!r}: {module_name} has no Distiller named {attr!r}; decorate the class with "
                          "@kdx.distill.register_distiller")
    return found

