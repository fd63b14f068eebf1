"""In-memory uint8 image tensors with light augmentation done in torch (fast enough for CPU runs)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kdx.data.fingerprint import tensors_fingerprint


class TensorImageDataset(Dataset):
    """Images N x C x H x W (uint8) and labels; returns normalised float images, optionally crop+flip augmented."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: bool = False, pad: int = 2, seed: int = 0) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape N x C x H x W")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment, self.pad = augment, pad
        self._norm = (mean, std)

    def without_augmentation(self) -> "TensorImageDataset":
        """The same images and labels, never augmented (the clean view)."""
        return TensorImageDataset(self.images, self.labels, *self._norm, augment=False, pad=self.pad)

    def fingerprint(self) -> str:
        """A hash of the images' and labels' bytes (kdx.data.fingerprint)."""
        return tensors_fingerprint(self.images, self.labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255)
        if self.augment:
            h, w = x.shape[-2:]
            x = F.pad(x, (self.pad,) * 4)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, i:i + h, j:j + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.labels[index])
