"""Models from the user's own module, named by import path: `student.name=my_pkg.nets:TinyNet`.

The name is `module:attribute` (or `module.attribute`, as in Hydra's `_target_`), where the attribute is an
`nn.Module` subclass, or a name the module registers with `kdx.models.register_model`. It is built with
`num_classes`, `in_chans` (when its signature takes it) and the model's `kwargs`. The name is stored in
checkpoints like any other model name, so `teacher.ckpt=...`, kdx-pipeline and `load_network` rebuild it
from the same import path (the module must be importable there too). Only classes and registered names are
accepted, never an arbitrary function, since a checkpoint names the model it holds.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from torch import nn

from kdx.errors import ConfigError


def split_import_path(name: str) -> tuple[str, str] | None:
    """(module, attribute) of `pkg.mod:Attr` or `pkg.mod.Attr`; None when `name` has no module part."""
    if ":" in name:
        module, _, attr = name.rpartition(":")
    elif "." in name:
        module, _, attr = name.rpartition(".")
    else:
        return None
    if not module or not attr or not all(part.isidentifier() for part in (*module.split("."), attr)):
        return None
    return module, attr


def find_user_model(name: str, registry: dict[str, Callable[..., nn.Module]]) -> Callable[..., nn.Module] | None:
    """The class or registered factory that `name` points at; None when `name` is no import path of a module
    that exists. An import path whose module exists but is broken, or whose attribute is missing or not a
    model, is a ConfigError naming it."""
    parts = split_import_path(name)
    if parts is None:
        return None
    module_name, attr = parts
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            if ":" in name:  # clearly meant as an import path
                raise ConfigError(f"model {name!r}: module {module_name!r} is not importable ({e}); add its folder "
                                  f"to PYTHONPATH or install it") from None
            return None
        raise ConfigError(f"model {name!r}: importing {module_name!r} failed ({e})") from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"model {name!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    target = getattr(module, attr, None)
    if isinstance(target, type) and issubclass(target, nn.Module):
        return target
    if attr in registry:  # the module registered it with @register_model(attr) while importing
        return registry[attr]
    if target is None:
        raise ConfigError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}")
    raise ConfigError(f"model {name!r} is a {type(target).__name__}, not an nn.Module class; point at the class, or "
                      f"register a factory with @kdx.models.register_model({attr!r}) in {module_name}")


def build_user_model(name: str, factory: Callable[..., nn.Module], num_classes: int, in_chans: int,
                     **kwargs: Any) -> nn.Module:
    """Call `factory` with num_classes, in_chans (when it takes it) and kwargs; the result must be an nn.Module."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if params and "num_classes" not in params and not open_kwargs:
        raise ConfigError(f"model {name!r} must take a num_classes argument (the data's class count); "
                          f"add num_classes to its __init__")
    args = {"num_classes": num_classes}
    if "in_chans" in params or open_kwargs:
        args["in_chans"] = in_chans
    try:
        model = factory(**args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r} cannot be built with {sorted({**args, **kwargs})} ({e}); "
                          f"check the model's kwargs") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model
