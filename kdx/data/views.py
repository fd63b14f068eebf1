"""Seeded views: each training image's augmentation is a function of (seed, view, sample index) alone.

A *view* is one augmented version of an image. With seeded views, the view a sample gets in an epoch is
`epoch` (a new view every epoch) or `epoch % views` (a fixed set of `views` per image, cycled), and its
random crop/flip comes from a generator seeded by (seed, view, index). So any run, on any machine, with any
number of loader workers or ranks, rebuilds exactly the same images, which is what lets a teacher's outputs
be computed once and reused (kdx.distill.cache).
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def view_of(epoch: int, views: int | None) -> int:
    """The view a sample is shown in `epoch`: the epoch itself, or cycled through `views` fixed views."""
    return int(epoch) % int(views) if views else int(epoch)


def view_seed(seed: int, view: int, index: int) -> int:
    """A 63-bit seed for one (seed, view, sample) triple; distinct triples give unrelated streams."""
    h = (int(seed) * 0x9E3779B97F4A7C15 + int(view) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB)
    h &= 0xFFFFFFFFFFFFFFFF
    h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SeededViewDataset(Dataset):
    """Wraps a dataset whose augmentation draws from torch's (or python's/numpy's) global generators.

    `dataset[(index, view)]` returns `(*dataset[index], index, view)`, computed with every global generator
    seeded from (seed, view, index) and restored afterwards, so the caller's random streams are untouched.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, view = key if isinstance(key, tuple) else (key, 0)
        s = view_seed(self.seed, view, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % (2 ** 32))
            try:
                item = self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        item = item if isinstance(item, tuple) else (item,)
        return (*item, index, view)


class ViewSampler(DistributedSampler):
    """Yields (index, view) pairs: a seeded shuffle per epoch, sharded over ranks like DistributedSampler.

    Lightning leaves a DistributedSampler in place under DDP and calls `set_epoch` on it each epoch, so the
    views advance on every rank alike. Outside DDP it is a plain seeded shuffle over one replica.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, views: int | None = None, shuffle: bool = True,
                 drop_last: bool = False, num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if dist else 1
            rank = torch.distributed.get_rank() if dist else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.views = int(views) if views else None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        view = view_of(self.epoch, self.views)
        return ((int(i), view) for i in super().__iter__())


def shard_size(n: int, replicas: int, drop_last: bool) -> int:
    """Samples per rank of a ViewSampler over `n` samples (as DistributedSampler counts them)."""
    return n // replicas if drop_last and n % replicas else math.ceil(n / replicas)
