"""Training samplers chosen by `data.sampler`: `null` (a plain shuffle) or `balanced` (each class equally likely).

`balanced` answers class imbalance, e.g. face datasets where a few identities have hundreds of images and most
have a handful: each draw picks a sample with probability 1 / (number of classes x size of its class), so every
identity (class) is drawn equally often in expectation, with replacement, `len(dataset)` draws an epoch.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from kdx.errors import ConfigError

SAMPLERS = ("balanced",)


def check_sampler(name: str | None) -> str | None:
    """`data.sampler` as given, or a ConfigError naming the choices."""
    if name in (None, "", "none", "null"):
        return None
    if name not in SAMPLERS:
        raise ConfigError(f"data.sampler={name!r} is not a sampler; use data.sampler=balanced (each class or "
                          "identity equally likely) or data.sampler=null (a plain shuffle)")
    return name


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every sample, read without loading any image (`labels`, `targets` or `samples` pairs)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None and hasattr(dataset, "samples"):
        labels = [label for _, label in dataset.samples]
    if labels is None:
        raise ConfigError(f"data.sampler=balanced needs the labels of {type(dataset).__name__} without reading its "
                          "images, which it does not give; set data.sampler=null")
    return [int(v) for v in (labels.tolist() if torch.is_tensor(labels) else labels)]


class BalancedSampler(DistributedSampler):
    """Seeded class-balanced draws with replacement, sharded over DDP ranks.

    A DistributedSampler, so Lightning leaves it in place under DDP and calls `set_epoch` each epoch: every
    rank makes the same global draw (seed + epoch) and keeps its own interleaved share of it.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, num_samples: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if dist else 1
            rank = torch.distributed.get_rank() if dist else 0
        super().__init__(range(len(labels)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if not labels:
            raise ConfigError("data.sampler=balanced got an empty training set; check data.root")
        counts = Counter(int(v) for v in labels)
        self.weights = torch.tensor([1.0 / (len(counts) * counts[int(v)]) for v in labels], dtype=torch.float64)
        self.total = int(num_samples or len(labels))
        self.num_samples = math.ceil(self.total / self.num_replicas)  # per rank, as DistributedSampler counts

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(int(self.seed) + int(self.epoch))
        draws = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=g)
        return iter(draws[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
