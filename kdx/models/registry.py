"""One registry of networks by name: kdx's own, torchvision's (`tv:`), timm's (`timm:`) and the user's own
classes by import path (`my_pkg.nets:TinyNet`). Every classifier it builds meets kdx.models.contract.

kdx's nets register themselves in their own files with `@register_model` (under the factory's own name) or
`@register_model("name")` on a factory `f(num_classes, in_chans, **kw)`; `embedding=True` marks a net whose
forward returns an embedding (the face nets), which `build_embedding_model` builds as it is instead of replacing
a classifier.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

from kdx.errors import ModelNotFoundError
from kdx.models.contract import declare_timm, declare_torchvision, get_classifier, reset_classifier, set_module
from kdx.models.custom import build_user_model, find_user_model
from kdx.models.hub import fetch_pretrained, timm_source, torchvision_source
from kdx.models.weights import load_weights

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered kdx network: its factory, and whether it returns an embedding instead of logits."""

    factory: Factory
    embedding: bool = False


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str | Factory | None = None, *, embedding: bool = False) -> Any:
    """Add a factory `f(num_classes, in_chans, **kw)` (or an nn.Module class) to the registry; returns it unchanged.

    Either way works:

        @register_model                                  # registered as "tiny_net", the factory's own name
        def tiny_net(num_classes, in_chans=3): ...

        @register_model("tiny", embedding=True)          # under a name of its own; embedding nets say so
        def tiny_face_net(num_classes, in_chans=3): ...
    """
    if callable(name):  # bare @register_model: the factory itself came in as `name`
        return _register(name, name.__name__, embedding)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"register_model takes a model name (a string) or a factory, got {type(name).__name__}")

    def deco(fn: Factory) -> Factory:
        return _register(fn, name or fn.__name__, embedding)

    return deco


def _register(fn: Factory, key: str, embedding: bool) -> Factory:
    if not callable(fn):
        raise TypeError(f"register_model({key!r}) decorates a factory or an nn.Module class, got {type(fn).__name__}")
    if key in _MODELS and _MODELS[key].factory is not fn:
        raise ValueError(f"model name {key!r} is already registered")
    _MODELS[key] = ModelEntry(fn, embedding)
    return fn


def registered_models() -> dict[str, Factory]:
    """kdx's registered factories by name (models registered by the user's modules included)."""
    return {name: entry.factory for name, entry in _MODELS.items()}


def is_embedding_model(name: str) -> bool:
    """True when `name` is a registered kdx net whose forward returns an embedding (IResNet, MobileFaceNet)."""
    entry = _MODELS.get(name.removeprefix("kdx:"))
    return entry is not None and entry.embedding


def _torchvision_names() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm  # imported when asked for: it takes a second

    return list(timm.list_models())


def list_models(source: str = "all") -> list[str]:
    """Names that build_model accepts: `kdx`, `torchvision`, `timm` or `all` (prefixed tv:/timm:)."""
    kdx_names = sorted(_MODELS)
    if source == "kdx":
        return kdx_names
    if source == "torchvision":
        return _torchvision_names()
    if source == "timm":
        return _timm_names()
    return kdx_names + [f"tv:{n}" for n in _torchvision_names()] + [f"timm:{n}" for n in _timm_names()]


def _split_source(name: str) -> tuple[str | None, str]:
    for prefix, source in (("tv:", "torchvision"), ("torchvision:", "torchvision"), ("timm:", "timm"), ("kdx:", "kdx")):
        if name.startswith(prefix):
            return source, name[len(prefix):]
    return None, name


def builtin_source(name: str) -> tuple[str, str] | None:
    """Which built-in registry (kdx, torchvision, timm) has `name`, or None; never imports a module."""
    source, bare = _split_source(name)
    if source in (None, "kdx") and bare in _MODELS:
        return "kdx", bare
    if source in (None, "torchvision") and bare in _torchvision_names():
        return "torchvision", bare
    if source in (None, "timm"):
        import timm

        if timm.is_model(bare):
            return "timm", bare
    return None


def resolve_source(name: str) -> tuple[str, str]:
    """Which registry builds `name` (kdx first, then torchvision, then timm, then an import path of the user's
    own module, `pkg.mod:Class`), or a ModelNotFoundError."""
    found = builtin_source(name)
    if found is not None:
        return found
    source, bare = _split_source(name)
    if source is None and find_user_model(name, registered_models()) is not None:
        return "import", name
    candidates = list(dict.fromkeys(sorted(_MODELS) + _torchvision_names() + _timm_names()))
    close = difflib.get_close_matches(bare, candidates, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; run `python -m kdx.models` to list them"
    raise ModelNotFoundError(f"unknown model name {name!r}{hint}")


def adapt_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Make the first 3-channel convolution accept `in_chans` channels, keeping pretrained filters useful."""
    if in_chans == 3:
        return model
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_chans, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None, module.padding_mode)
            with torch.no_grad():
                w = module.weight.sum(dim=1, keepdim=True)  # grey = sum of RGB filters
                new.weight.copy_(w.repeat(1, in_chans, 1, 1) / in_chans)
                if module.bias is not None:
                    new.bias.copy_(module.bias)
            set_module(model, path, new)
            return model
    raise ValueError(f"{type(model).__name__} has no 3-channel input convolution to adapt to {in_chans} channels")


def _is_local_file(pretrained: Any) -> bool:
    return isinstance(pretrained, (str, Path)) and (
        str(pretrained).endswith((".pt", ".pth", ".ckpt", ".bin", ".safetensors")) or Path(str(pretrained)).exists())


def build_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool | str = False,
                **kwargs: Any) -> nn.Module:
    """Build a network by name; `pretrained` is True, a torchvision weights name, or a local file path."""
    source, bare = resolve_source(name)
    local_path = pretrained if _is_local_file(pretrained) else None
    hub = bool(pretrained) and local_path is None
    if source == "kdx":
        if hub:
            raise ModelNotFoundError(f"kdx model {bare!r} has no downloadable weights; set pretrained to a local checkpoint path")
        model = _MODELS[bare].factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    elif source == "torchvision":
        if hub:
            weights = "DEFAULT" if pretrained is True else str(pretrained)
            model = fetch_pretrained(name, torchvision_source(bare, weights),
                                     lambda: torchvision.models.get_model(bare, weights=weights, **kwargs))
            declare_torchvision(model, bare)
            reset_classifier(model, num_classes)
        else:
            model = declare_torchvision(torchvision.models.get_model(bare, weights=None, num_classes=num_classes,
                                                                     **kwargs), bare)
        model = adapt_in_chans(model, in_chans)
    elif source == "import":
        if hub:
            raise ModelNotFoundError(f"model {bare!r} of your own module has no downloadable weights; set pretrained "
                                     f"to a local weights file")
        model = build_user_model(bare, find_user_model(bare, registered_models()), num_classes, in_chans, **kwargs)
    else:
        import timm

        def create():
            return timm.create_model(bare, pretrained=hub, num_classes=num_classes, in_chans=in_chans, **kwargs)

        model = declare_timm(fetch_pretrained(name, timm_source(bare), create) if hub else create())
    if local_path is not None:
        load_weights(model, local_path)
        if not (source == "kdx" and _MODELS[bare].embedding) and get_classifier(model).out_features != num_classes:
            reset_classifier(model, num_classes)
    return model
