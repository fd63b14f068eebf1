"""Rebuild trained networks from kdx checkpoints alone (architecture, classes and weights are all inside)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdx.errors import CheckpointError
from kdx.models import build_model


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU; a missing or unreadable file is a CheckpointError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .ckpt written by kdx-train")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated file, not a torch file, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated") from e


def load_network(path: str | Path, num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(network, kdx metadata) from a kdx checkpoint; checks the number of classes against the data when given."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("kdx") if isinstance(ckpt, dict) else None
    if not meta or "model_name" not in meta:
        raise CheckpointError(f"checkpoint {path} was not written by kdx (no 'kdx' section); "
                              f"use teacher.pretrained=PATH for plain weight files")
    if num_classes is not None and int(meta["num_classes"]) != int(num_classes):
        raise CheckpointError(f"checkpoint {path} predicts {meta['num_classes']} classes but the data has "
                              f"{num_classes}; use a checkpoint trained on this dataset")
    net = build_model(meta["model_name"], num_classes=int(meta["num_classes"]), in_chans=int(meta.get("in_chans", 3)),
                      **dict(meta.get("model_kwargs") or {}))
    prefix = meta.get("network_prefix", "net.")
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks weights for {missing[:3]}...; it does not match {meta['model_name']}")
    return net, meta
