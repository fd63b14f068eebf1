"""Rebuild trained networks from kdx checkpoints alone (architecture, classes and weights are all inside).

Every checkpoint is read with `torch.load(weights_only=True)` (kdx.io.safe_torch_load): tensors and plain
Python values only, so a crafted file cannot run code. kdx's own checkpoints are written to load that way:
`plain_checkpoint` turns their metadata into plain types before each save (see its docstring for why).

The model name a checkpoint records never chooses a module to import (`checked_model_name`): a built-in name
(kdx, torchvision, timm) is built as it is; an import path of the user's own class (`my_nets:TinyNet`) only
when the user named it too, in a config's teacher/student section or as `model_name` (kdx-export
--model-name). Sizes a file records (classes, channels, embedding width) are bounded before anything is built.
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from kdx.errors import CheckpointError, NonFiniteError
from kdx.io import safe_torch_load
from kdx.models.margin_heads import CombinedMarginHead, build_margin_head
from kdx.models import build_embedding_model, build_model, builtin_source, strip_prefix
from kdx.models.custom import split_import_path
from kdx.models.onnx_teacher import OnnxEmbeddingModel
from kdx.schemas import configured_model_names

# Sections of a Lightning checkpoint that only describe the run (what kdx and Lightning record about the
# module, the datamodule and the network). Lightning copies `save_hyperparameters()` arguments into them
# as they are, which may be OmegaConf containers, paths, numpy scalars or enums: objects that
# `weights_only=True` refuses. They are converted to plain values (the information is kept, the class is
# not). An allow-list of extra safe globals for torch.load was the other option; it was not taken because
# every reader (kdx-eval, teacher.ckpt, a user's own torch.load) would need the same list.
METADATA_SECTIONS = ("hyper_parameters", "datamodule_hyper_parameters", "kdx", "hparams_name")
# Sections that hold training state to resume from. Converting a value there would silently change what
# a resumed run restores, so a non-plain value is refused at save time instead, naming where it sits.
STATE_SECTIONS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
# what a checkpoint may ask to be built: far above any real network, far below an allocation that kills the host
MAX_CLASSES = 1_000_000
MAX_IN_CHANS = 1024
MAX_EMBEDDING_SIZE = 65536


def to_plain(value: Any) -> Any:
    """`value` with every container made a dict/list/tuple and every leaf a tensor or a plain scalar."""
    if isinstance(value, _SCALARS) or isinstance(value, (torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, enum.Enum):
        return to_plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if OmegaConf.is_config(value):
        return to_plain(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, dict):
        return {(k if isinstance(k, (str, int, float, bool, type(None))) else str(k)): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_plain(v) for v in (sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value)]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy()) if value.dtype != object else to_plain(value.tolist())
    return str(value)


def _first_non_plain(value: Any, where: str) -> str | None:
    """The path of the first value weights_only=True would refuse, or None."""
    if isinstance(value, _SCALARS) or isinstance(value, (torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return None
    if isinstance(value, (dict, OrderedDict)) and type(value) in (dict, OrderedDict):
        for k, v in value.items():
            found = _first_non_plain(v, f"{where}[{k!r}]")
            if found:
                return found
        return None
    if type(value) in (list, tuple, set):
        for i, v in enumerate(value):
            found = _first_non_plain(v, f"{where}[{i}]")
            if found:
                return found
        return None
    return f"{where} ({type(value).__module__}.{type(value).__qualname__})"


def plain_metadata(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Make the metadata sections of a checkpoint plain in place (what kdx modules do in on_save_checkpoint,
    so their checkpoints load with weights_only=True under any Trainer, not only kdx's)."""
    for key in METADATA_SECTIONS:
        if key in checkpoint:
            checkpoint[key] = to_plain(checkpoint[key])
    return checkpoint


def plain_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Make a checkpoint loadable with weights_only=True: metadata made plain, training state checked.

    Raises CheckpointError naming the first value of the training state (optimizer, schedulers, loops,
    callbacks) that is not a tensor or plain value, because resuming from such a file would need code.
    """
    for key in list(checkpoint):
        if key in METADATA_SECTIONS or key not in ("state_dict", *STATE_SECTIONS):
            checkpoint[key] = to_plain(checkpoint[key])
    for key in STATE_SECTIONS:
        if key in checkpoint:
            found = _first_non_plain(checkpoint[key], key)
            if found:
                raise CheckpointError(f"the checkpoint's {found} is not a tensor or plain value, so the file could "
                                      f"not be loaded without running code; make that object's state_dict() plain")
    return checkpoint


def check_finite_weights(state_dict: dict[str, Any], where: str = "") -> None:
    """Raise NonFiniteError naming the first floating-point tensor of `state_dict` holding NaN or inf."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            if not bool(torch.isfinite(value).all()):
                bad = value.detach().float()
                kind = "NaN" if bool(torch.isnan(bad).any()) else "inf"
                raise NonFiniteError(f"weight {name} holds {kind} values{where}, so no checkpoint was written (those "
                                     f"written before are kept); lower optim.lr or check the data and the loss")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU without running code; a CheckpointError names a missing,
    unreadable or code-carrying file."""
    ckpt = safe_torch_load(path, what="checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict; "
                              f"pass a .ckpt written by kdx-train")
    return ckpt


def checked_model_name(name: Any, path: str | Path, model_name: str | None = None) -> str:
    """The model name a checkpoint records, when building it imports no module the file chose.

    Built-in names (kdx, torchvision, timm) pass. An import path (`pkg.mod:Class`) passes only when the user
    gave the same name: `model_name` (a command-line option), or a teacher/student name of a config checked in
    this process (kdx.schemas.configured_model_names). Otherwise it is one CheckpointError saying what to pass.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"checkpoint {path} records no usable model name (got {name!r}); pass a checkpoint "
                              f"written by kdx-train")
    if builtin_source(name) is not None or split_import_path(name) is None:
        return name  # a built-in name, or an unknown plain one (build_model names close matches)
    if name == model_name or name in configured_model_names():
        return name
    raise CheckpointError(f"checkpoint {path} names the model {name!r}, an import path, and kdx never imports a "
                          f"module that a file names; if you trust that code, pass the name yourself on the command "
                          f"line or in the config (teacher.name={name} or student.name={name}; kdx-export and "
                          f"kdx-eval: --model-name {name})")


def _checked_size(meta: dict[str, Any], key: str, path: str | Path, limit: int, default: Any = None) -> int:
    """meta[key] as a whole number in [1, limit], or a CheckpointError naming the key."""
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() or \
            not 1 <= value <= limit:
        raise CheckpointError(f"checkpoint {path} records {key}={value!r}, which is not a whole number in "
                              f"[1, {limit:,}]; the file is damaged or was not written by kdx-train")
    return int(value)


def load_network(path: str | Path, num_classes: int | None = None,
                 model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(network, kdx metadata) from a kdx checkpoint; checks the number of classes against the data when given.
    `model_name` is the user's own name for the network (see `checked_model_name`)."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("kdx")
    if not isinstance(meta, dict) or "model_name" not in meta:
        raise CheckpointError(f"checkpoint {path} was not written by kdx (no 'kdx' section); "
                              f"use teacher.pretrained=PATH for plain weight files")
    classes = _checked_size(meta, "num_classes", path, MAX_CLASSES)
    in_chans = _checked_size(meta, "in_chans", path, MAX_IN_CHANS, default=3)
    if num_classes is not None and classes != int(num_classes):
        raise CheckpointError(f"checkpoint {path} predicts {meta['num_classes']} classes but the data has "
                              f"{num_classes}; use a checkpoint trained on this dataset")
    name = checked_model_name(meta["model_name"], path, model_name)
    kwargs = meta.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"checkpoint {path} records model_kwargs as a {type(kwargs).__name__}, not a mapping; "
                              f"the file is damaged or was not written by kdx-train")
    net = build_model(name, num_classes=classes, in_chans=in_chans, **kwargs)
    state = strip_prefix(ckpt["state_dict"], meta.get("network_prefix", "net."))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks weights for {missing[:3]}...; it does not match {meta['model_name']}")
    return net, meta


def check_resume_fits(path: str | Path, module: nn.Module, checkpoint: dict[str, Any] | None = None) -> None:
    """Raise CheckpointError when the checkpoint to resume from (`checkpoint`, else read from `path`) holds
    weights of another architecture than `module`."""
    state = (checkpoint if checkpoint is not None else read_checkpoint(path)).get("state_dict") or {}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        detail = (f"weight {shapes[0]} is {tuple(state[shapes[0]].shape)} there but {tuple(own[shapes[0]].shape)} now"
                  if shapes else f"it lacks {missing[0]}" if missing else f"it has {unexpected[0]}, which this network lacks")
        raise CheckpointError(f"cannot resume from {path}: it was written by a different network ({detail}); resume "
                              f"with the config the run was started with, or start a new run (drop resume=)")


def load_embedding_model(path: str | Path, model_name: str | None = None, **onnx_kwargs) -> nn.Module:
    """An embedding network from an .onnx file or a kdx face checkpoint (read without running code);
    `model_name` is the user's own name for the network (see `checked_model_name`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist; pass an .onnx file or a torch checkpoint")
    if path.suffix.lower() == ".onnx":
        return OnnxEmbeddingModel(path, **onnx_kwargs)
    obj = safe_torch_load(path, what="model file")  # weights_only: a pickled model (code) is refused, named
    if isinstance(obj, dict):
        spec = (obj.get("kdx") or {}).get("embedding_model") or (obj.get("hyper_parameters") or {}).get("embedding_model")
        if isinstance(spec, dict) and spec:
            name = checked_model_name(spec.get("name"), path, model_name)
            kwargs = spec.get("kwargs") or {}
            if not isinstance(kwargs, dict):
                raise CheckpointError(f"{path} records the model's kwargs as a {type(kwargs).__name__}, not a "
                                      f"mapping; the file is damaged or was not written by kdx-train")
            model = build_embedding_model(name, _checked_size(spec, "embedding_size", path, MAX_EMBEDDING_SIZE, 512),
                                          in_chans=_checked_size(spec, "in_chans", path, MAX_IN_CHANS, 3),
                                          input_size=spec.get("input_size", 112), **kwargs)
            state = strip_prefix(obj.get("state_dict", obj), (obj.get("kdx") or {}).get("network_prefix", "net."),
                                 required=False)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing:
                raise CheckpointError(f"{path} lacks {len(missing)} weights of {spec['name']} (first: {missing[:3]}); "
                                      "is it a checkpoint of this model?")
            return model.eval()
    raise CheckpointError(f"{path} is not a kdx face checkpoint (it has no kdx.embedding_model section); pass a "
                          "checkpoint written by kdx-train with a face task, or export the model to .onnx")


def load_face_checkpoint(path: str | Path, model_name: str | None = None
                         ) -> tuple[nn.Module, CombinedMarginHead | None, dict[str, Any]]:
    """(embedding net, margin head or None, kdx metadata) of a checkpoint written by a face run; `model_name` as
    in `load_embedding_model`."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("kdx") if isinstance(ckpt, dict) else None
    if not meta or "embedding_model" not in meta:
        raise CheckpointError(f"checkpoint {path} is not a kdx face checkpoint (no kdx.embedding_model); "
                              "pass the best.ckpt of a task=face run, or an ONNX model as teacher.onnx")
    net = load_embedding_model(path, model_name)
    head = None
    head_state = strip_prefix(ckpt.get("state_dict", {}), meta.get("head_prefix", "head."))
    if head_state and "weight" in head_state:
        weight = head_state["weight"]
        classes = _checked_size(meta, "num_classes", path, 1 << 31)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[0] != classes:
            raise CheckpointError(f"checkpoint {path} records num_classes={classes} but its margin head's weight is "
                                  f"{tuple(getattr(weight, 'shape', ()))}; the file is damaged")
        head = build_margin_head(int(net.embedding_size), classes, **(meta.get("margin") or {}))
        head.load_state_dict(head_state)
    return net, head, meta
