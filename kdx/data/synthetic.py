"""Synthetic images whose classes are learnable: each class is a fixed random pattern plus noise and a shift."""
from __future__ import annotations

import torch

from kdx.data.base import KdxDataModule
from kdx.data.tensor_images import TensorImageDataset
from kdx.schemas import number


def make_synthetic_images(num_samples: int, num_classes: int, image_size: int, in_chans: int, noise: float,
                          pattern_seed: int, sample_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images N x C x H x W and balanced labels; `pattern_seed` fixes the class patterns."""
    g = torch.Generator().manual_seed(pattern_seed)
    cells = max(2, image_size // 4)
    templates = torch.rand(num_classes, in_chans, cells, cells, generator=g)
    templates = torch.nn.functional.interpolate(templates, size=(image_size, image_size), mode="nearest")
    g.manual_seed(sample_seed)
    labels = torch.randperm(num_samples, generator=g) % num_classes
    images = templates[labels] + noise * torch.randn(num_samples, in_chans, image_size, image_size, generator=g)
    shifts = torch.randint(-1, 2, (num_samples, 2), generator=g)
    images = torch.stack([img.roll(tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts)])
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


class SyntheticDataModule(KdxDataModule):
    """Class-dependent random patterns for tests and smoke runs; no files, no downloads."""

    # checked with the config, before any work (kdx.schemas.check_arguments)
    CONFIG_BOUNDS = {
        "num_classes": number(4, 2, hint="a classifier needs at least two classes"),
        "image_size": number(16, 1),
        "in_chans": number(3, 1),
        "train_size": number(512, 1, hint="training needs at least one image"),
        "val_size": number(128, 1, hint="validation picks the best checkpoint; it needs at least one image"),
        "test_size": number(128, 1),
        "noise": number(0.25, 0, hint="noise is the standard deviation of the added Gaussian noise"),
    }

    def __init__(self, num_classes: int = 4, image_size: int = 16, in_chans: int = 3, train_size: int = 512,
                 val_size: int = 128, test_size: int = 128, noise: float = 0.25, seed: int = 0, **loader_kwargs) -> None:
        super().__init__(**loader_kwargs)
        self.sizes = (int(train_size), int(val_size), int(test_size))
        self.noise, self.seed = float(noise), int(seed)
        self.class_names = [f"class_{i}" for i in range(int(num_classes))]
        self.in_chans, self.image_size = int(in_chans), int(image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        mean, std = (0.5,) * self.in_chans, (0.25,) * self.in_chans
        sets = []
        for split, n in enumerate(self.sizes):
            images, labels = make_synthetic_images(n, self.num_classes, self.image_size, self.in_chans, self.noise,
                                                   pattern_seed=self.seed, sample_seed=self.seed * 7919 + split + 1)
            sets.append(TensorImageDataset(images, labels, mean, std))
        self.train_set, self.val_set, self.test_set = sets
