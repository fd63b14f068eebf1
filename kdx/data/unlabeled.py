"""Unlabeled transfer sets: images without labels that a student is distilled on with the teacher's targets.

Unlabeled images carry the label -1 (`UNLABELED`): cross-entropy ignores them, distillation uses them all.
They come from a flat folder of images (`data.unlabeled=DIR`) or from the unlabeled remainder of a dataset
whose labels are kept for only a fraction of its images (`data.labeled_fraction`).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kdx.data.images import decode_image, list_images
from kdx.errors import DataError

UNLABELED = -1


def load_image_tensor(folder: str | os.PathLike, size: int, in_chans: int) -> torch.Tensor:
    """Every image of a flat folder as uint8 N x C x size x size (grey or RGB, resized); unreadable files named."""
    arrays = []
    for path in list_images(folder):
        img = decode_image(path, in_chans, (size, size), hint="remove it from the unlabeled folder")
        arr = np.asarray(img, dtype=np.uint8)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def keep_labels(labels: torch.Tensor, fraction: float | None, key: str = "data.labeled_fraction") -> torch.Tensor:
    """Labels with all but the first round(fraction * N) set to UNLABELED (the order is already shuffled)."""
    if fraction is None:
        return labels
    if isinstance(fraction, bool) or not 0 < float(fraction) <= 1:
        raise DataError(f"{key} must be a number in (0, 1], got {fraction!r}")
    keep = max(1, round(float(fraction) * len(labels)))
    out = labels.clone()
    out[keep:] = UNLABELED
    return out
