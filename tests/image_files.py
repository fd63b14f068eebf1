"""Writers of small real image folders (JPEG/PNG files on disk) for data and pipeline tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (230, 200, 40)]


def class_image(label: int, index: int, size: int = 24, seed: int = 0) -> Image.Image:
    """An RGB image whose colour and stripe direction depend on the class, with per-image noise."""
    rng = np.random.default_rng(seed * 100003 + label * 1009 + index)
    base = np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
    img = np.tile(base, (size, size, 1))
    stripes = (np.arange(size) // 3) % 2 == 0
    if label % 2:
        img[:, stripes] *= 0.4
    else:
        img[stripes, :] *= 0.4
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_class_folder(root: Path, num_classes: int = 3, per_class: int = 12, size: int = 24,
                       fmt: str = "JPEG", seed: int = 0) -> Path:
    """root/class_k/img_i.jpg for k < num_classes; returns root."""
    for k in range(num_classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            class_image(k, i, size, seed).save(folder / f"img_{i:03d}.{ext}", fmt)
    return root


def write_split_folders(root: Path, num_classes: int = 3, sizes=(12, 4, 4), size: int = 24) -> Path:
    """root/{train,val,test}/class_k/*.jpg with different images per split."""
    for split, n, seed in zip(("train", "val", "test"), sizes, (0, 1, 2)):
        write_class_folder(root / split, num_classes, n, size, seed=seed)
    return root
