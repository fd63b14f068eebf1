"""What kdx needs of a network, in timm's words, and how each source of networks provides it.

Every classifier that `kdx.models.build_model` returns declares
- `classifier_path`: the module path of its classifier layer (an nn.Linear), so `get_classifier(model)`,
  `reset_classifier(model, n)` and `penultimate_features(model, x)` (the features the classifier reads)
  work on it;
- `feature_stages`: module paths of its stage outputs, shallow to deep (the layers feature-distillation
  methods tap by default; empty when a network has none).

kdx's own nets declare both in their class (`ClassifierNet`); timm models answer through their own
`get_classifier()` and `feature_info`; torchvision models get them at build time from the family tables
below; a class of the user's own (`student.name=my_pkg.nets:TinyNet`) declares them, or names its
classifier `fc`, `classifier` or `head`. Embedding networks (kdx's face nets) have no classifier: they
declare `embedding_size`, `input_size`, `feature_stages` and `classifier_path = None`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from kdx.errors import ConfigError

# torchvision classification families -> module path of the classifier layer (longest matching name prefix wins)
TORCHVISION_CLASSIFIERS = {
    "resnet": "fc", "resnext": "fc", "wide_resnet": "fc", "shufflenet": "fc", "regnet": "fc", "googlenet": "fc",
    "inception": "fc", "mobilenet_v2": "classifier.1", "mobilenet_v3": "classifier.3", "efficientnet": "classifier.1",
    "mnasnet": "classifier.1", "vgg": "classifier.6", "alexnet": "classifier.6", "densenet": "classifier",
    "convnext": "classifier.2", "vit": "heads.head", "swin": "head", "maxvit": "classifier.5",
}
# the attribute names a network of the user's own may give its classifier instead of declaring classifier_path
CONVENTIONAL_CLASSIFIERS = ("fc", "classifier", "head")


class ClassifierNet(nn.Module):
    """Base of kdx's own classifiers: `forward_features` (pooled features) then the classifier at `fc`."""

    classifier_path = "fc"
    feature_stages: tuple[str, ...] = ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """B x num_features: the pooled features the classifier reads."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised classifier for `num_classes` classes."""
        self.fc = nn.Linear(self.fc.in_features, num_classes, bias=self.fc.bias is not None)


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    return next((path for path, m in model.named_modules() if m is module and path), None)


def _no_classifier(model: nn.Module) -> ConfigError:
    return ConfigError(f"{type(model).__name__} declares no classifier layer: give the class a `classifier_path` "
                       f"attribute (the module path of its nn.Linear classifier) or a get_classifier() method")


def classifier_path(model: nn.Module) -> str:
    """Module path of the network's classifier layer (see the module docstring for how it is declared)."""
    declared = getattr(model, "classifier_path", "")
    if declared is None:  # an embedding network says it has none
        raise _no_classifier(model)
    if isinstance(declared, str) and declared:
        return declared
    get = getattr(model, "get_classifier", None)
    if callable(get):
        path = _path_of(model, get())
        if path:
            return path
    for name in CONVENTIONAL_CLASSIFIERS:
        if isinstance(getattr(model, name, None), nn.Linear):
            return name
    raise _no_classifier(model)


def get_classifier(model: nn.Module) -> nn.Linear:
    """The network's classifier layer (an nn.Linear)."""
    path = classifier_path(model)
    layer = model.get_submodule(path)
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"the classifier of {type(model).__name__} ({path}) is a {type(layer).__name__}, not an "
                          f"nn.Linear; kdx needs a linear classifier there")
    return layer


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at `path`."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def reset_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Give the network a freshly initialised classifier for `num_classes` classes (timm's name)."""
    if callable(getattr(model, "reset_classifier", None)):
        model.reset_classifier(num_classes)
        return model
    path = classifier_path(model)
    old = get_classifier(model)
    set_module(model, path, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return model


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


def penultimate_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model once and return (features entering the classifier, logits)."""
    path = classifier_path(model)
    with capture_inputs(model, [path]) as taps:
        logits = model(x)
    return taps[path].flatten(1), logits


def feature_stages(model: nn.Module) -> list[str]:
    """Module paths of a network's stage outputs, shallow to deep: its declared `feature_stages`, else timm's
    `feature_info`; an empty list means: name the layers yourself."""
    declared = getattr(model, "feature_stages", None)
    if declared:
        return list(declared)
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and isinstance(info[0], dict) and "module" in info[0]:
        return [i["module"] for i in info if i.get("module")]
    return []


def _torchvision_stages(model: nn.Module) -> list[str]:
    """Stage outputs of a torchvision classifier: ResNets' layer1-4, ShuffleNets' stage2-4, and the last block of
    each resolution of a `features` stack (MobileNets, EfficientNets, VGG, ...)."""
    children = dict(model.named_children())
    for names in (("layer1", "layer2", "layer3", "layer4"), ("stage2", "stage3", "stage4")):
        if all(n in children for n in names):
            return list(names)
    features = children.get("features")
    if isinstance(features, nn.Sequential) and len(features) > 1:
        names = [name for name, _ in features.named_children()]
        stages = []
        for i, block in enumerate(features):
            strides = [m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d)]
            if i > 0 and any(s > 1 for s in strides):
                stages.append(f"features.{names[i - 1]}")
        stages.append(f"features.{names[-1]}")
        return stages[1:] if len(stages) > 4 else stages
    return []


def declare_torchvision(model: nn.Module, name: str) -> nn.Module:
    """Attach the contract to a torchvision classifier `name` (its family's classifier path and its stages)."""
    family = max((f for f in TORCHVISION_CLASSIFIERS if name.startswith(f)), key=len, default=None)
    if family is None:
        raise ConfigError(f"torchvision model {name!r} has no linear classifier kdx knows of (families: "
                          f"{', '.join(sorted(TORCHVISION_CLASSIFIERS))}); use another model or a timm one")
    model.classifier_path = TORCHVISION_CLASSIFIERS[family]
    model.feature_stages = tuple(_torchvision_stages(model))
    return model


def declare_timm(model: nn.Module) -> nn.Module:
    """Record where a timm model's classifier sits (timm models answer get_classifier() and feature_info)."""
    path = _path_of(model, model.get_classifier())
    if path:
        model.classifier_path = path
    return model
