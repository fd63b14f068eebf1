"""Weights from files: read a state dict without running code, strip a module prefix, load what fits."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from kdx.errors import CheckpointError
from kdx.io import safe_torch_load


def strip_prefix(state: Mapping[str, Any], prefix: str, required: bool = True) -> dict[str, Any]:
    """The entries of `state` under `prefix` (e.g. "net." of a Lightning module), with the prefix removed.

    With `required=False`, a state dict with no key under `prefix` is returned as it is (a plain network's
    state dict rather than a module's checkpoint)."""
    if not required and not any(k.startswith(prefix) for k in state):
        return dict(state)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """The tensors of a local weights file (.safetensors, a state dict, or a kdx/Lightning checkpoint), read
    without running code: torch files load with weights_only=True, so a pickled whole model is refused."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; pass an existing checkpoint path")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # optional: timm depends on it
        except ImportError:  # pragma: no cover
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
    state = strip_prefix(state, prefix, required=False)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    if strict and len(usable) != len(own):
        missing = sorted(set(own) - set(usable))[:5]
        raise CheckpointError(f"weights file {path} does not fit the model (first missing keys: {missing})")
    if not usable:
        raise CheckpointError(f"weights file {path} shares no parameter with the model; check the model name")
    model.load_state_dict(usable, strict=False)
    return model
