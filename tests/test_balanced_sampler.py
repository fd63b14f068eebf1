"""data.sampler=balanced on a skewed identity folder of real image files: identities drawn equally often."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_train
from kdx.data.face import FaceFolderDataModule
from kdx.data.samplers import BalancedSampler, check_sampler
from kdx.errors import ConfigError
from kdx.configs import build_datamodule

# 8 identities, 2 of them held out for pairs: whichever two the seeded split holds out, the 6 training
# identities keep a skew of 10x or more (at least one of 60, 50, 40 images against at least one of 4)
SIZES = [60, 50, 40, 4, 4, 4, 4, 4]


@pytest.fixture(scope="module")
def skewed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("skewed")
    rng = np.random.default_rng(0)
    for i, n in enumerate(SIZES):
        d = root / f"id{i:02d}"
        d.mkdir()
        for j in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{j}.png")
    return root


def _epoch_identities(dm: FaceFolderDataModule, epochs: int) -> Counter:
    counts: Counter = Counter()
    loader = dm.train_dataloader()
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            counts.update(batch["labels"].tolist())
    return counts


def _module(root, sampler):
    dm = FaceFolderDataModule(root, val_identities=2, num_val_pairs=4, batch_size=16, image_size=12, seed=0,
                              train_flip=False, sampler=sampler)
    dm.setup("fit")
    return dm


def test_balanced_draws_every_identity_equally_often_where_a_shuffle_follows_the_skew(skewed_root):
    plain, balanced = _module(skewed_root, None), _module(skewed_root, "balanced")
    sizes = sorted(Counter(label for _, label in balanced.train_set.samples).values(), reverse=True)
    assert len(sizes) == 6 and sizes[0] >= 10 * sizes[-1]  # the split kept a skew of 10x or more
    shuffled = _epoch_identities(plain, epochs=5)
    assert max(shuffled.values()) / min(shuffled.values()) > 0.7 * sizes[0] / sizes[-1]  # a shuffle keeps the skew
    drawn = _epoch_identities(balanced, epochs=10)
    n = sum(drawn.values())
    assert n == 10 * (len(balanced.train_set) // 16 * 16) and len(drawn) == 6  # full batches (drop_last)
    expected = n / 6
    chi2 = sum((c - expected) ** 2 / expected for c in drawn.values())
    assert chi2 < 20.5, drawn  # p = 0.001 for 5 degrees of freedom: uniform over identities
    assert min(drawn.values()) > 0.75 * expected


def test_balanced_draws_are_seeded_per_epoch_and_sharded_over_ranks():
    labels = [0] * 90 + [1] * 9 + [2]
    a = list(BalancedSampler(labels, seed=3, num_replicas=1, rank=0))
    assert a == list(BalancedSampler(labels, seed=3, num_replicas=1, rank=0))  # same seed, same epoch: same draws
    sampler = BalancedSampler(labels, seed=3, num_replicas=1, rank=0)
    sampler.set_epoch(1)
    assert list(sampler) != a  # a new epoch draws anew
    ranks = [list(BalancedSampler(labels, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 50
    assert sorted(ranks[0] + ranks[1]) == sorted(a)  # the two ranks split one global draw between them
    weights = BalancedSampler(labels).weights
    assert torch.allclose(weights[[0, 90, 99]], torch.tensor([1 / 270, 1 / 27, 1 / 3], dtype=torch.float64))


def test_a_bad_sampler_name_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="data.sampler='weighted' is not a sampler; use data.sampler=balanced"):
        check_sampler("weighted")


def test_the_face_configs_take_the_sampler_option(skewed_root):
    cfg = compose_train(["experiment=orl_faces", "data=face_folder", f"data.root={skewed_root}",
                         "data.sampler=balanced", "data.val_identities=2", "data.num_val_pairs=4"])
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, BalancedSampler)
