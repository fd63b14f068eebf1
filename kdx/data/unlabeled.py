"""Unlabeled transfer sets: images without labels that a student is distilled on with the teacher's targets.

Unlabeled images carry the label -1 (`UNLABELED`): cross-entropy ignores them, distillation uses them all.
They come from a flat folder of images (`data.unlabeled=DIR`) or from the unlabeled remainder of a dataset
whose labels are kept for only a fraction of its images (`data.labeled_fraction`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from kdx.data.images import open_image
from kdx.errors import DataError

UNLABELED = -1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder` and below it, sorted; a DataError when there are none."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data.unlabeled={folder} is not a folder; point it at a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"data.unlabeled={folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                        "point it at a folder of images")
    return files


def load_image_tensor(folder: str | os.PathLike, size: int, in_chans: int) -> torch.Tensor:
    """Every image of a flat folder as uint8 N x C x size x size (grey or RGB, resized); unreadable files named."""
    mode = "L" if in_chans == 1 else "RGB"
    arrays = []
    for path in list_images(folder):
        img = open_image(path, hint="remove it from the unlabeled folder").convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size))
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
