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

from kdx.data.mixing import TEACHER_STREAM, MixSpec, check_mix, check_teacher_view, draw_one, mix_pair


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

    `dataset[(index, view)]` returns `(*dataset[index], index, view)`, computed with the global generators
    seeded from (seed, view, index) and restored afterwards, so the caller's random streams are untouched.
    torch's generator is always seeded (~3 us); python's and numpy's cost 20 and 110 us an item, so the first
    `probe_items` items check whether the dataset draws from them at all, and they are seeded from then on if
    it does (and for those first items too: a probe that finds a draw recomputes the item seeded).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, probe_items: int = 64) -> None:
        self.dataset, self.seed = dataset, int(seed)
        self.probe_items = int(probe_items)
        self.seen = 0
        self.seed_python = self.seed_numpy = False

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int, s: int, python: bool, numpy: bool):
        cpu = torch.default_generator  # directly: torch.manual_seed would also set up CUDA, ~1 ms a call
        torch_state = cpu.get_state()
        py_state = random.getstate() if python else None
        np_state = np.random.get_state() if numpy else None
        cpu.manual_seed(s)
        if python:
            random.seed(s)
        if numpy:
            np.random.seed(s % (2 ** 32))
        try:
            return self.dataset[index]
        finally:
            cpu.set_state(torch_state)
            if python:
                random.setstate(py_state)
            if numpy:
                np.random.set_state(np_state)

    def __getitem__(self, key):
        index, view = key if isinstance(key, tuple) else (key, 0)
        s = view_seed(self.seed, view, index)
        if self.seen < self.probe_items and not (self.seed_python and self.seed_numpy):
            self.seen += 1
            py_before, np_before = random.getstate(), np.random.get_state()
            item = self._load(index, s, self.seed_python, self.seed_numpy)
            moved_py = random.getstate() != py_before
            np_after = np.random.get_state()
            moved_np = np_after[2] != np_before[2] or not np.array_equal(np_after[1], np_before[1])
            if moved_py or moved_np:  # this dataset draws from them: seed them from now on, and redo this item
                random.setstate(py_before)
                np.random.set_state(np_before)
                self.seed_python |= moved_py
                self.seed_numpy |= moved_np
                item = self._load(index, s, self.seed_python, self.seed_numpy)
        else:
            item = self._load(index, s, self.seed_python, self.seed_numpy)
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


def stream_seed(seed: int, stream: int) -> int:
    """The seed of an independent stream of views (stream 0 is the run's seed itself)."""
    return int(seed) if stream == 0 else view_seed(seed, -0x7EAC, stream) & 0x7FFFFFFF


class ViewRecords(Dataset):
    """`records[(index, view)]` is one training record (kdx.data.batch): the sample's seeded view, mixed with
    a partner when `mix` is on, and the teacher's image when `teacher_view` is not `consistent`.

    Every random choice is a function of (seed, view, index): the augmentation (SeededViewDataset), the
    mixing partner, lambda and box (kdx.data.mixing.draw_one); an `independent` teacher's view and mix come
    from stream 1 of the same seed; a `fixed` teacher sees `clean[index]` (the image without augmentation).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, mix: MixSpec | None = None,
                 teacher_view: str = "consistent", clean: Dataset | None = None) -> None:
        self.mix = check_mix(mix)
        self.teacher_view = check_teacher_view(teacher_view)
        self.seed = int(seed)
        self.student = SeededViewDataset(dataset, self.seed)
        self.teacher = SeededViewDataset(dataset, stream_seed(self.seed, TEACHER_STREAM)) \
            if self.teacher_view == "independent" else None
        if self.teacher_view == "fixed" and clean is None:
            raise ValueError("teacher_view='fixed' needs the dataset without augmentation (clean)")
        self.clean = clean

    def __len__(self) -> int:
        return len(self.student)

    def _view(self, views: SeededViewDataset, stream: int, index: int, view: int) -> tuple[torch.Tensor, int, int, float]:
        """(image, label, partner label, lam) of one stream: the seeded view, mixed when mixing is on."""
        image, label = views[(index, view)][:2]
        if not self.mix.active:
            return image, int(label), int(label), 1.0
        partner, lam, box, cut = draw_one(self.mix, self.seed, view, index, len(views), tuple(image.shape[-2:]), stream)
        if lam >= 1.0:
            return image, int(label), int(label), 1.0
        other, other_label = views[(partner, view)][:2]
        return mix_pair(image, other, lam, box, cut), int(label), int(other_label), lam

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, view = key if isinstance(key, tuple) else (key, 0)
        image, label, partner_label, lam = self._view(self.student, 0, index, view)
        record = {"images": image, "labels": torch.tensor(label), "index": torch.tensor(int(index)),
                  "view": torch.tensor(int(view)), "teacher_view": torch.tensor(int(view))}
        if self.mix.active:
            record["partner_labels"] = torch.tensor(partner_label)
            record["lam"] = torch.tensor(lam, dtype=torch.float32)
        if self.teacher is not None:
            record["teacher_images"] = self._view(self.teacher, TEACHER_STREAM, index, view)[0]
        elif self.clean is not None and self.teacher_view == "fixed":
            record["teacher_images"] = self.clean[index][0]
            record["teacher_view"] = torch.tensor(0)  # one clean image per sample: one stored teacher output
        return record
