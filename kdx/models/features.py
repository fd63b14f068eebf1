"""Read what a network computes inside without editing it: penultimate features and layers by module path."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from kdx.models.registry import find_head


def penultimate_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model once and return (features entering the classifier, logits)."""
    with capture_inputs(model, [find_head(model)[0]]) as taps:
        logits = model(x)
    return taps[find_head(model)[0]].flatten(1), logits


@contextmanager
def capture_inputs(model: nn.Module, paths: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, `taps[path]` holds the input the module at `path` last received."""
    taps: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        def hook(_m, args, _out, path=path):
            taps[path] = args[0]
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_outputs(model: nn.Module, paths: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, `taps[path]` holds the output of the module at `path` (for feature losses)."""
    taps: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise KeyError(f"module path {path!r} is not in {type(model).__name__}") from e

        def hook(_m, _args, out, path=path):
            taps[path] = out
        handles.append(module.register_forward_hook(hook))
    try:
        yield taps
    finally:
        for h in handles:
            h.remove()
