"""Rebuild the network to export from a kdx checkpoint alone, with what the export needs to know about it.

`load_export_network(ckpt)` gives the network in eval mode (a classifier through `kdx.checkpoints.load_network`,
a face embedding net through `kdx.checkpoints.load_embedding_model`) and its description: task, architecture,
input shape, output name, class names and the input normalisation when the checkpoint records one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kdx.checkpoints import load_embedding_model, load_network, read_checkpoint
from kdx.errors import CheckpointError
from kdx.export.errors import ExportError


def _hw(size: Any, where: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        return int(size[0]), int(size[1])
    raise ExportError(f"{where} records the image size {size!r}, which is not an int or [H, W]; pass input_size=(H, W) "
                      f"(--input-size H W)")


def _normalization(ckpt: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any] | None:
    """{"mean": [...], "std": [...]} when the checkpoint records the input normalisation, else None."""
    places = [meta, meta.get("embedding_model") or {}, ckpt.get("datamodule_hyper_parameters") or {}]
    for place in places:
        if not isinstance(place, dict):
            continue
        for key in ("normalization", "normalisation", "normalize"):
            value = place.get(key)
            if isinstance(value, dict) and "mean" in value and "std" in value:
                return {"mean": _plain(value["mean"]), "std": _plain(value["std"])}
        for mean_key, std_key in (("mean", "std"), ("data_mean", "data_std")):
            if place.get(mean_key) is not None and place.get(std_key) is not None:
                return {"mean": _plain(place[mean_key]), "std": _plain(place[std_key])}
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist() if value.numel() != 1 else value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_export_network(ckpt_path: str | Path, input_size: Sequence[int] | None = None,
                        model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode, description) of a kdx checkpoint: a classifier or a face embedding net.

    The description holds task, architecture, input shape (C, H, W), output name, class names and the
    normalisation when recorded. Raises CheckpointError for a missing, unreadable or non-kdx file.
    """
    path = Path(ckpt_path).expanduser()
    if path.is_file():  # say "not a checkpoint" for an ONNX, JSON or image file, rather than an unpickling error
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or legacy pickle
            raise CheckpointError(f"{path} is not a kdx checkpoint (not a torch file at all); pass a checkpoint "
                                  f"written by kdx-train (<run>/checkpoints/best.ckpt)")
    ckpt = read_checkpoint(path)  # missing / unreadable / code-carrying files: CheckpointError, one sentence
    meta = ckpt.get("kdx")
    if not isinstance(meta, dict) or not ("model_name" in meta or "embedding_model" in meta):
        raise CheckpointError(f"{path} is not a kdx checkpoint (it has no kdx section naming the network); pass a "
                              f"checkpoint written by kdx-train (<run>/checkpoints/best.ckpt)")
    if "embedding_model" in meta:  # a face run: the embedding network, without its margin head
        spec = meta["embedding_model"]
        net = load_embedding_model(path, model_name)
        task, arch, output = "face", str(spec.get("name")), "embedding"
        in_chans = int(spec.get("in_chans", 3))
        size = input_size if input_size is not None else spec.get("input_size", getattr(net, "input_size", None))
    else:
        net, meta = load_network(path, model_name=model_name)
        task, arch, output = "classification", str(meta["model_name"]), "logits"
        in_chans = int(meta.get("in_chans", 3))
        size = input_size if input_size is not None else meta.get("image_size")
    if size is None:
        raise ExportError(f"{path} records no input image size; pass input_size=(H, W) (--input-size H W)")
    h, w = _hw(list(size) if isinstance(size, tuple) else size, str(path))
    desc = {"task": task, "architecture": arch, "input_shape": [in_chans, h, w], "output_name": output,
            "class_names": [str(c) for c in (meta.get("class_names") or [])],
            "num_classes": int(meta["num_classes"]) if meta.get("num_classes") is not None else None,
            "normalization": _normalization(ckpt, meta)}
    if task == "face":
        desc["embedding_size"] = int(meta["embedding_model"].get("embedding_size", 0)) or None
    return net.eval(), desc
