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


def feature_stages(model: nn.Module) -> list[str]:
    """Module paths of a network's stage outputs, shallow to deep (the default layers of feature distillers).

    kdx nets declare `feature_stages`; timm models answer through `feature_info`; torchvision ResNets,
    ShuffleNets and the `features` stacks of MobileNets/EfficientNets are recognised by their layout.
    An empty list means: name the layers yourself.
    """
    declared = getattr(model, "feature_stages", None)
    if declared:
        return list(declared)
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and isinstance(info[0], dict) and "module" in info[0]:
        return [i["module"] for i in info if i.get("module")]
    children = dict(model.named_children())
    for names in (("layer1", "layer2", "layer3", "layer4"), ("stage2", "stage3", "stage4")):
        if all(n in children for n in names):
            return list(names)
    features = children.get("features")
    if isinstance(features, nn.Sequential) and len(features) > 1:  # the last block of each resolution
        stages, previous_stride = [], None
        for i, block in enumerate(features):
            strides = [m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d)]
            if previous_stride is not None and any(s > 1 for s in strides):
                stages.append(f"features.{i - 1}")
            previous_stride = 1
        stages.append(f"features.{len(features) - 1}")
        return stages[1:] if len(stages) > 4 else stages
    return []
