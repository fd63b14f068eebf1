"""Image transforms: ImageNet-style defaults for natural images, crop-and-flip for small ones."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(values: Sequence[float] | None, default: Sequence[float], in_chans: int) -> list[float]:
    values = list(values) if values else list(default)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    return [sum(values) / len(values)] * in_chans  # e.g. ImageNet RGB stats for a grey model


def build_transforms(image_size: int, in_chans: int, train: bool, augment: str = "auto",
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> T.Compose:
    """PIL image -> normalised tensor; `augment` is `imagenet`, `small`, `none` or `auto` (by image size)."""
    if augment == "auto":
        augment = "imagenet" if image_size >= 96 else "small"
    if augment not in ("imagenet", "small", "none"):
        raise ValueError(f"data.augment must be imagenet, small, none or auto, got {augment!r}")
    steps: list = []
    if train and augment == "imagenet":
        steps += [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    elif train and augment == "small":
        steps += [T.Resize((image_size, image_size), antialias=True),
                  T.RandomCrop(image_size, padding=max(1, image_size // 8)), T.RandomHorizontalFlip()]
    elif augment == "imagenet":
        steps += [T.Resize(int(round(image_size / 0.875)), antialias=True), T.CenterCrop(image_size)]
    else:
        steps += [T.Resize((image_size, image_size), antialias=True)]
    steps += [T.ToTensor(), T.Normalize(_stats(mean, IMAGENET_MEAN, in_chans), _stats(std, IMAGENET_STD, in_chans))]
    return T.Compose(steps)


def _as_list(value: Any) -> list[float]:
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)]


def input_normalization(dm: Any) -> dict[str, list[float]] | None:
    """{"mean": [...], "std": [...]} of the datamodule's images ((x/255 - mean) / std, per channel), read from
    its evaluation set (a dataset's own mean/std, or the Normalize step of its transform), else from the
    datamodule's `mean`/`std`; None when it cannot be told. Recorded in checkpoints so exports can state it."""
    for name in ("val_set", "test_set", "train_set"):
        dataset = getattr(dm, name, None)
        for _ in range(4):  # Subset and similar wrappers hold the real dataset in .dataset
            if dataset is None:
                break
            if getattr(dataset, "mean", None) is not None and getattr(dataset, "std", None) is not None:
                return {"mean": _as_list(dataset.mean), "std": _as_list(dataset.std)}
            steps = getattr(getattr(dataset, "transform", None), "transforms", None) or []
            for step in steps:
                if isinstance(step, T.Normalize):
                    return {"mean": _as_list(step.mean), "std": _as_list(step.std)}
            dataset = getattr(dataset, "dataset", None)
    if getattr(dm, "mean", None) is not None and getattr(dm, "std", None) is not None:
        return {"mean": _as_list(dm.mean), "std": _as_list(dm.std)}
    return None
