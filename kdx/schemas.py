"""Config schemas: which keys a config section has, their types and their bounds, and one check that turns a
wrong value into one sentence naming the key.

A section is checked against either
- a dataclass (`check_section`): its fields are the keys, their annotations the types, and `number(...)`
  fields carry bounds; the result is an instance of the dataclass with the defaults filled in; or
- the signature of what the section builds (`check_arguments`): a datamodule's `__init__`, an optimizer
  class, pl.Trainer, a distillation method. Keys must be arguments (unless it takes **kwargs), and values
  must fit the argument's annotation (or the type of its default).

Hydra has already parsed the values (`8` is an int, `abc` a str), so a check is about the parsed type:
`distill.temperature=abc` is "distill.temperature must be a number, got 'abc'", before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from pathlib import PurePath
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar

from kdx.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def number(default: Any, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, allowed: tuple = (), hint: str = "") -> Any:
    """A dataclass field for a finite number within bounds (`allowed` values pass as they are, e.g. -1)."""
    return dataclasses.field(default=default, metadata={"bounds": (low, high, low_open, high_open), "allowed": allowed,
                                                        "hint": hint})


def choice(default: Any, *options: Any) -> Any:
    """A dataclass field whose value must be one of `options`."""
    return dataclasses.field(default=default, metadata={"choices": options})


def mapping(**defaults: Any) -> Any:
    """A dataclass field holding a dict (a fresh copy of `defaults` per instance)."""
    return dataclasses.field(default_factory=lambda: dict(defaults))


# --------------------------------------------------------------------------- one value against one type
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "a whole number"
    if tp is float:
        return "a number"
    if tp is str:
        return "a text"
    origin = typing.get_origin(tp)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        return "a list"
    if origin in (dict, typing.Mapping) or tp is dict:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        args = [a for a in args if _expressible(a)] or args
        text = " or ".join(dict.fromkeys(_describe(a) for a in args))
        return text + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    return getattr(tp, "__name__", str(tp))


def _expressible(tp: Any) -> bool:
    """True for the annotations a config value can take: scalars, text, paths, lists, mappings, literals."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return all(_expressible(a) for a in typing.get_args(tp))
    return tp in (bool, int, float, str, list, tuple, dict, type(None)) or origin in (
        list, tuple, dict, typing.Literal, typing.Sequence, typing.Mapping, typing.Iterable) or (
        isinstance(tp, type) and issubclass(tp, PurePath))


def fits(value: Any, tp: Any) -> bool:
    """True when a parsed config value fits the annotation `tp` (unknown annotations accept anything)."""
    if tp is Any or tp is inspect.Parameter.empty or tp is object:
        return True
    if value is None:
        return tp is type(None) or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                    and type(None) in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        known = [a for a in members if _expressible(a)]  # Union[float, Tensor]: a config can only give the float
        return any(fits(value, a) for a in (known or members))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return _is_number(value) and float(value).is_integer()
    if tp is float:
        return _is_number(value)
    if tp is str or (isinstance(tp, type) and issubclass(tp, PurePath)):
        return isinstance(value, (str, int, float)) and not isinstance(value, bool) or isinstance(value, PurePath)
    if origin in (list, tuple, typing.Sequence, typing.Iterable) or tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, typing.Mapping) or tp is dict:
        return isinstance(value, Mapping)
    return True  # tensors, callables, classes: not expressible in a config; the builder checks them


def check_value(key: str, value: Any, tp: Any, bounds: tuple | None = None, allowed: tuple = (),
                choices: tuple = (), hint: str = "") -> None:
    """Raise a ConfigError naming `key` unless `value` fits `tp`, `choices` and `bounds`."""
    tail = f"; {hint}" if hint else ""
    if value in allowed and not isinstance(value, bool):
        return
    if choices and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(str(c) for c in choices)}, got {value!r}{tail}")
    if bounds is not None and value is not None:
        low, high, low_open, high_open = bounds
        whole = tp is int or (typing.get_origin(tp) in (typing.Union, types.UnionType) and int in typing.get_args(tp))
        if not _is_number(value):
            raise ConfigError(f"{key} must be {'a whole number' if whole else 'a number'}, got {value!r}{tail}")
        ok = math.isfinite(value) and (not whole or float(value).is_integer())
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            if low is not None and high is not None:
                kind = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            else:
                limit = f"{'>' if low_open else '>='} {low:g}" if low is not None else \
                    f"{'<' if high_open else '<='} {high:g}"
                kind = f"{'a whole number' if whole else 'a finite number'} {limit}"
            raise ConfigError(f"{key} must be {kind}, got {value!r}{tail}")
        return
    if not fits(value, tp):
        raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}{tail}")


# --------------------------------------------------------------------------- a section against a schema
def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _unknown_key(prefix: str, key: str, known: list[str], what: str, noun: str = "a key") -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(_join(prefix, c) for c in close)}?" if close else \
        f"; its {noun.split()[-1]}s: {', '.join(known)}" if known else ""
    return ConfigError(f"{_join(prefix, key)} is not {noun} of {what}{hint}")


def schema_fields(schema: type) -> dict[str, dataclasses.Field]:
    """The fields of a dataclass schema by name."""
    return {f.name: f for f in dataclasses.fields(schema)}


def check_section(values: Mapping[str, Any] | None, schema: type[T], prefix: str, what: str | None = None,
                  ignore: tuple[str, ...] = ()) -> T:
    """`values` (a plain dict) checked against the dataclass `schema`: an unknown key or a value of the wrong
    type or out of bounds is a ConfigError naming `prefix.key`. Returns the schema instance (defaults filled in)."""
    values = {k: v for k, v in dict(values or {}).items() if k not in ignore}
    fields = schema_fields(schema)
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(prefix, key, sorted(fields), what or prefix or "the config")
        meta = fields[key].metadata
        nested = hints.get(key)
        if dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            values[key] = check_section(value, nested, _join(prefix, key), what=_join(prefix, key))
            continue
        check_value(_join(prefix, key), value, hints.get(key, Any), bounds=meta.get("bounds"),
                    allowed=meta.get("allowed", ()), choices=meta.get("choices", ()), hint=meta.get("hint", ""))
    return schema(**values)


def _parameters(target: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(keyword parameters, resolved annotations, takes **kwargs) of a callable or a class's __init__,
    following **kwargs up the class hierarchy."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    classes = inspect.getmro(target) if inspect.isclass(target) else (target,)
    for cls in classes:
        fn = cls.__init__ if inspect.isclass(target) else cls
        if fn is object.__init__:
            return params, hints, False
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, hints, True
        try:
            resolved = typing.get_type_hints(fn)
        except Exception:  # annotations naming types this module cannot resolve: use the defaults' types
            resolved = {}
        for name, p in sig.parameters.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in ("self", "cls") and name not in params:
                params[name] = p
                if name in resolved:
                    hints[name] = resolved[name]
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, hints, False
    return params, hints, True


def check_arguments(values: Mapping[str, Any] | None, target: Callable, prefix: str, what: str,
                    ignore: tuple[str, ...] = (), reserved: tuple[str, ...] = ()) -> None:
    """Check the keys of `values` against the keyword arguments of `target` (a class or a function): an
    argument it does not take (or one in `reserved`, which the builder passes itself), or a value that does
    not fit the argument's annotation (or its default's type), is a ConfigError naming `prefix.key`.

    A class may declare bounds of its arguments as `CONFIG_BOUNDS = {name: number(...)}` (a datamodule's sizes,
    say); they are checked here too, so a bad value is refused before any work."""
    params, hints, open_kwargs = _parameters(target)
    declared = {}
    for cls in (inspect.getmro(target) if inspect.isclass(target) else ()):
        declared = {**dict(getattr(cls, "CONFIG_BOUNDS", None) or {}), **declared}
    params = {k: v for k, v in params.items() if k not in reserved}
    for key, value in dict(values or {}).items():
        if key in ignore:
            continue
        if key not in params:
            if open_kwargs:
                continue
            raise _unknown_key(prefix, key, sorted(params), what, noun="a parameter")
        tp = hints.get(key, inspect.Parameter.empty)
        if tp is inspect.Parameter.empty:
            default = params[key].default
            tp = type(default) if isinstance(default, (bool, int, float)) else Any
            if tp is int:
                tp = float  # an int default (momentum=0) does not make the argument a whole number
        field = declared.get(key)
        meta = field.metadata if isinstance(field, dataclasses.Field) else {}
        check_value(_join(prefix, key), value, tp, bounds=meta.get("bounds"), allowed=meta.get("allowed", ()),
                    choices=meta.get("choices", ()), hint=meta.get("hint", ""))


# --------------------------------------------------------------------------- the sections every run has
_CONFIGURED_MODEL_NAMES: set[str] = set()


def configured_model_names() -> frozenset[str]:
    """The model names that a `teacher`/`student` section of a config checked in this process gave: the only
    import paths (`my_nets:TinyNet`) that a checkpoint naming one may have built (kdx.checkpoints), since a
    file must never choose a module to import."""
    return frozenset(_CONFIGURED_MODEL_NAMES)


@dataclass
class ModelSpec:
    """`teacher` / `student`: a network by registry name, with optional weights."""

    name: Optional[str] = None           # a kdx, torchvision (tv:) or timm (timm:) name, or my_pkg.nets:Class
    pretrained: Any = False              # true (downloaded weights), a weights name, or a local weights file
    ckpt: Optional[str] = None           # a kdx-train checkpoint: architecture, classes and weights from it
    kwargs: Dict[str, Any] = mapping()   # the model factory's own arguments
    onnx: Optional[str] = None           # face teachers: an .onnx embedding model (or `sface`)
    preprocess: Optional[Dict[str, Any]] = None  # face teachers: what the ONNX model expects
    device: Optional[str] = None         # face teachers: where onnxruntime runs
    head: Optional[str] = None           # face teachers: null (a kdx face checkpoint's own margin head, if any) or
                                         # centroids (a cosine head over this run's identities, kdx.distill.teachers)

    def __post_init__(self) -> None:
        if isinstance(self.name, str) and self.name:
            _CONFIGURED_MODEL_NAMES.add(self.name)  # given by the user's config or command line


@dataclass
class CheckpointOptions:
    """`checkpoint`: which metric picks the best checkpoint, and what is kept."""

    monitor: Optional[str] = "val/acc1"
    mode: str = choice("max", "max", "min")
    save_last: bool = True
    save_top_k: int = number(1, -1)


@dataclass
class OptimOptions:
    """`optim`: the optimizer class and kdx's per-step schedule. Keys not listed here are arguments of the
    optimizer class (momentum, nesterov, betas, ...), checked against its signature."""

    _target_: str = "torch.optim.SGD"
    lr: float = number(0.1, 0, low_open=True, hint="set a positive learning rate, e.g. optim.lr=0.05")
    weight_decay: float = number(0.0, 0)
    schedule: str = choice("cosine", "cosine", "step", "constant")
    warmup_epochs: float = number(0.0, 0)
    min_lr_ratio: float = number(0.0, 0, 1)
    milestones: List[float] = dataclasses.field(default_factory=lambda: [0.5, 0.75])
    gamma: float = number(0.1, 0, low_open=True)


@dataclass
class TrainerOptions:
    """`trainer` keys kdx reads itself; every other key is a pl.Trainer argument, checked against its signature."""

    progress_bar: str = "auto"           # checked by kdx.progress (auto | rich | tqdm | log | none)
    progress_every: Any = "auto"         # auto, or a whole number of steps
    channels_last: bool = False
    compile: bool = False


@dataclass
class RunOptions:
    """The top-level keys of a kdx-train config."""

    run_name: str = "run"
    seed: int = 0
    resume: Any = False                  # false, true, or a run/sweep folder
    force: bool = False
    optimized_metric: Optional[str] = None
