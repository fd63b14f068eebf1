"""Batches of an in-memory image set that stays resident on the training device, augmented there.

For datasets that fit in (GPU) memory, such as Fashion-MNIST, moving every batch from loader workers to the
device is the bottleneck of a fast step. `DeviceBatches` keeps the uint8 images on the device once and does
the shuffle, the random shift (zero padding, then a crop) and the horizontal flip for a whole batch in a few
tensor operations. Each sample's shift and flip come from an integer hash of (seed, view, index), so views
are seeded (see kdx.data.views) and the teacher cache can serve them. On a CPU it runs the same code.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from kdx.data.mixing import TEACHER_STREAM, MixSpec, check_mix, check_teacher_view, draw_mix, mix_batch
from kdx.data.views import stream_seed, view_of

_MASK31 = 0x7FFFFFFF


def sample_hash(seed: int, view: torch.Tensor | int, index: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer per sample from (seed, view, index), the same on every device (int64 arithmetic)."""
    h = index.long() * 2654435761 + int(seed) * 97 + 1
    h = h + torch.as_tensor(view, device=index.device).long() * 40503
    h = h ^ (h >> 15)
    h = (h & _MASK31) * 2246822519
    h = h ^ (h >> 13)
    h = (h & _MASK31) * 3266489917
    return (h ^ (h >> 16)) & _MASK31


def shift_and_flip(images: torch.Tensor, hashes: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift each image by up to `pad` pixels (zero fill) and mirror about half of them, as the hashes say."""
    b, _, h, w = images.shape
    span = 2 * pad + 1
    di, dj = hashes % span, (hashes // span) % span
    flip = ((hashes // (span * span)) % 2).bool()
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = di[:, None] + torch.arange(h, device=images.device)[None, :]
    cols = dj[:, None] + torch.arange(w, device=images.device)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class DeviceBatches:
    """An iterable of batches over resident images: training records (kdx.data.batch) or (x, y) for evaluation.

    Mixing (`mix`) and the teacher's view (`teacher_view`) follow kdx.data.views.ViewRecords: the partner,
    lambda and box of each sample are `kdx.data.mixing.draw_one` of (seed, view, index), the partner shifted and
    flipped by its own hash; an `independent` teacher's view uses stream 1's seed, a `fixed` one the clean image.

    `set_epoch` (called by Lightning through `.sampler`) picks the epoch's shuffle and view; with several
    ranks each takes every `world`-th sample of the shuffled order, like DistributedSampler.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 batch_size: int, device: torch.device | str = "cpu", train: bool = False, augment: bool = False,
                 pad: int = 2, seed: int = 0, views: int | None = None, drop_last: bool = False, rank: int = 0,
                 world: int = 1, mix: MixSpec | None = None, teacher_view: str = "consistent") -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.long().to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.batch_size, self.train, self.augment, self.pad = int(batch_size), bool(train), bool(augment), int(pad)
        self.seed, self.views, self.drop_last = int(seed), views, bool(drop_last)
        self.rank, self.world = int(rank), int(world)
        self.mix, self.teacher_view = check_mix(mix), check_teacher_view(teacher_view)
        self.epoch = 0
        self.sampler = self  # Lightning calls `dataloader.sampler.set_epoch(epoch)` on anything that has it
        self.batch_sampler = None  # (and reads these two, as of a DataLoader, to judge shuffling)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s shuffle and view next time the batches are iterated."""
        self.epoch = int(epoch)

    def _order(self) -> torch.Tensor:
        n = self.images.shape[0]
        if not self.train:
            order = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(n, generator=g)
        per_rank = math.ceil(n / self.world)
        if self.world > 1:  # pad to a multiple of the world size, as DistributedSampler does
            order = torch.cat([order, order[: per_rank * self.world - n]])
        return order[self.rank::self.world]

    def __len__(self) -> int:
        n = math.ceil(self.images.shape[0] / self.world)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _view(self, idx: torch.Tensor, view: int, stream: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(images, partner labels, lam) of one stream's view of samples `idx`: shifted, flipped, mixed."""
        seed = stream_seed(self.seed, stream)
        x = self._augment(idx, seed, view)
        if not self.mix.active:
            return x, None, None
        draws = draw_mix(self.mix, self.seed, view, idx, self.images.shape[0], tuple(x.shape[-2:]), stream)
        partner = draws.partner.to(self.device)
        return mix_batch(x, self._augment(partner, seed, view), draws), self.labels[partner], \
            draws.lam.to(self.device)

    def _augment(self, idx: torch.Tensor, seed: int, view: int) -> torch.Tensor:
        x = self.images[idx].float().div_(255)
        if self.augment:
            x = shift_and_flip(x, sample_hash(seed, view, idx), self.pad)
        return (x - self.mean) / self.std

    def __iter__(self) -> Iterator:
        order = self._order().to(self.device)
        view = view_of(self.epoch, self.views)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            if not self.train:
                x = self.images[idx].float().div_(255)
                yield (x - self.mean) / self.std, self.labels[idx]
                continue
            x, partner_labels, lam = self._view(idx, view, 0)
            views = torch.full_like(idx, view)
            record = {"images": x, "labels": self.labels[idx], "index": idx, "view": views, "teacher_view": views}
            if partner_labels is not None:
                record.update(partner_labels=partner_labels, lam=lam)
            if self.teacher_view == "independent":
                record["teacher_images"] = self._view(idx, view, TEACHER_STREAM)[0]
            elif self.teacher_view == "fixed":
                clean = self.images[idx].float().div_(255)
                record["teacher_images"] = (clean - self.mean) / self.std
                record["teacher_view"] = torch.zeros_like(idx)
            yield record
