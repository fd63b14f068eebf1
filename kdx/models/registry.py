"""One place to build any network by name: kdx's own nets, torchvision's and timm's."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdx.errors import CheckpointError, ModelNotFoundError
from kdx.models.cifar_resnet import CIFAR_RESNETS
from kdx.models.small_cnn import SMALL_CNNS
from kdx.models.wrn import WIDE_RESNETS

_KDX_MODELS: dict[str, Callable[..., nn.Module]] = {**CIFAR_RESNETS, **WIDE_RESNETS, **SMALL_CNNS}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that adds a factory `f(num_classes, in_chans, **kw)` to kdx's registry."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _KDX_MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        _KDX_MODELS[name] = fn
        return fn

    return deco


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def list_models(source: str = "all") -> list[str]:
    """Names that build_model accepts: `kdx`, `torchvision`, `timm` or `all` (prefixed tv:/timm:)."""
    kdx_names = sorted(_KDX_MODELS)
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


def resolve_source(name: str) -> tuple[str, str]:
    """Which registry builds `name` (kdx first, then torchvision, then timm, then an import path of the user's
    own module, `pkg.mod:Class`), or a ModelNotFoundError."""
    source, bare = _split_source(name)
    if source in (None, "kdx") and bare in _KDX_MODELS:
        return "kdx", bare
    if source in (None, "torchvision") and bare in _torchvision_names():
        return "torchvision", bare
    if source in (None, "timm"):
        import timm

        if timm.is_model(bare):
            return "timm", bare
    if source is None:  # a model class of the user's own module: my_pkg.nets:TinyNet
        from kdx.models.custom import find_user_model

        if find_user_model(name, _KDX_MODELS) is not None:
            return "import", name
    candidates = list(dict.fromkeys(sorted(_KDX_MODELS) + _torchvision_names() + _timm_names()))
    close = difflib.get_close_matches(bare, candidates, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; run `python -m kdx.models` to list them"
    raise ModelNotFoundError(f"unknown model name {name!r}{hint}")


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier layer: the last nn.Linear of the network, by module path."""
    last = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (path, module)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return last


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give the network a freshly initialised classifier for `num_classes` classes."""
    if hasattr(model, "reset_classifier"):  # timm models know how
        model.reset_classifier(num_classes)
        return model
    path, head = find_head(model)
    if head.out_features != num_classes:
        _set_module(model, path, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
    return model


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
            _set_module(model, path, new)
            return model
    raise ValueError(f"{type(model).__name__} has no 3-channel input convolution to adapt to {in_chans} channels")


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """The tensors of a local weights file (.safetensors, a state dict, or a kdx/Lightning checkpoint), read
    without running code: torch files load with weights_only=True, so a pickled whole model is refused."""
    from kdx.io import safe_torch_load

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; pass an existing checkpoint path")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - timm depends on safetensors
            raise CheckpointError(f"reading {path} needs the safetensors package; pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"weights file {path} is not a readable .safetensors file ({e})") from None
    obj = safe_torch_load(path, what="weights file")
    if not isinstance(obj, dict):
        raise CheckpointError(f"weights file {path} holds a {type(obj).__name__}, not a state dict; save "
                              f"model.state_dict() instead")
    return obj


def load_weights(model: nn.Module, path: str | Path, strict: bool = False) -> nn.Module:
    """Load a state dict, a kdx/Lightning checkpoint or a .safetensors file into `model` (tensors only)."""
    path = Path(path).expanduser()
    obj = read_weights_file(path)
    state = obj.get("state_dict", obj)
    meta = obj.get("kdx")
    prefix = meta.get("network_prefix", "net.") if isinstance(meta, dict) else "net."
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} has a state_dict entry that is not a dict of tensors")
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    if strict and len(usable) != len(own):
        missing = sorted(set(own) - set(usable))[:5]
        raise CheckpointError(f"weights file {path} does not fit the model (first missing keys: {missing})")
    if not usable:
        raise CheckpointError(f"weights file {path} shares no parameter with the model; check the model name")
    model.load_state_dict(usable, strict=False)
    return model


def build_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool | str = False,
                **kwargs: Any) -> nn.Module:
    """Build a classifier by name; `pretrained` is True, a torchvision weights name, or a local file path."""
    source, bare = resolve_source(name)
    local_path = pretrained if isinstance(pretrained, (str, Path)) and (
        str(pretrained).endswith((".pt", ".pth", ".ckpt", ".bin", ".safetensors")) or Path(str(pretrained)).exists()) else None
    hub = bool(pretrained) and local_path is None
    if source == "kdx":
        if hub:
            raise ModelNotFoundError(f"kdx model {bare!r} has no downloadable weights; set pretrained to a local checkpoint path")
        model = _KDX_MODELS[bare](num_classes=num_classes, in_chans=in_chans, **kwargs)
    elif source == "torchvision":
        import torchvision

        if hub:
            from kdx.models.hub import fetch_pretrained, torchvision_source

            weights = "DEFAULT" if pretrained is True else str(pretrained)
            model = fetch_pretrained(name, torchvision_source(bare, weights),
                                     lambda: torchvision.models.get_model(bare, weights=weights, **kwargs))
            model = replace_head(model, num_classes)
        else:
            model = torchvision.models.get_model(bare, weights=None, num_classes=num_classes, **kwargs)
        model = adapt_in_chans(model, in_chans)
    elif source == "import":
        from kdx.models.custom import build_user_model, find_user_model

        if hub:
            raise ModelNotFoundError(f"model {bare!r} of your own module has no downloadable weights; set pretrained "
                                     f"to a local weights file")
        model = build_user_model(bare, find_user_model(bare, _KDX_MODELS), num_classes, in_chans, **kwargs)
    else:
        import timm

        def create():
            return timm.create_model(bare, pretrained=hub, num_classes=num_classes, in_chans=in_chans, **kwargs)

        if hub:
            from kdx.models.hub import fetch_pretrained, timm_source

            model = fetch_pretrained(name, timm_source(bare), create)
        else:
            model = create()
    if local_path is not None:
        load_weights(model, local_path)
        if find_head(model)[1].out_features != num_classes:
            replace_head(model, num_classes)
    return model
