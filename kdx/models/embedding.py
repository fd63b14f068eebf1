"""Embedding networks by name: kdx's face nets as they are, or any classifier with its classifier replaced."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdx.configs import as_hw
from kdx.errors import ConfigError
from kdx.models.contract import classifier_path, get_classifier, set_module
from kdx.models.registry import build_model, is_embedding_model, registered_models, resolve_source
from kdx.models.weights import load_weights


class EmbeddingHead(nn.Sequential):
    """Linear(features, embedding_size) + BatchNorm1d: the classifier replacement of an embedding net."""

    def __init__(self, in_features: int, embedding_size: int):
        super().__init__(nn.Linear(in_features, embedding_size), nn.BatchNorm1d(embedding_size))


def build_embedding_model(name: str, embedding_size: int = 512, in_chans: int = 3, pretrained: bool | str = False,
                          input_size: int | Sequence[int] = 112, **kwargs) -> nn.Module:
    """A network whose forward returns an unnormalised B x embedding_size embedding (attribute `embedding_size`)."""
    if not isinstance(embedding_size, int) or embedding_size <= 0:
        raise ConfigError(f"model.embedding_size must be a positive integer, got {embedding_size!r}")
    bare = name.removeprefix("kdx:")
    if is_embedding_model(name):
        model = registered_models()[bare](num_classes=0, in_chans=in_chans, embedding_size=embedding_size,
                                          input_size=input_size, **kwargs)
        if pretrained:
            if pretrained is True or not Path(str(pretrained)).expanduser().exists():
                raise ConfigError(f"face model {name!r} has no downloadable weights; set model.pretrained to a local "
                                  f"checkpoint file (got {pretrained!r})")
            load_weights(model, pretrained, strict=True)  # a face net must take every weight: a wrong arch is an error
    else:
        resolve_source(name)  # raises ModelNotFoundError with suggestions
        model = build_model(name, num_classes=embedding_size, in_chans=in_chans, pretrained=pretrained, **kwargs)
        set_module(model, classifier_path(model), EmbeddingHead(get_classifier(model).in_features, embedding_size))
    model.embedding_size = embedding_size
    model.input_size = as_hw(input_size)  # what the net expects; `fit_input` resizes other batches to it
    return model


def fit_input(x: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    """`x` (B x C x H x W) resized to `size` (bilinear, antialiased) when its spatial size differs; else `x`."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False, antialias=True)


def model_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The H x W an embedding network was built for (attribute `input_size`), or None when unknown."""
    size = getattr(model, "input_size", None)
    return as_hw(size) if size is not None else None
