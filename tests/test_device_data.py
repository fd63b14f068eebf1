"""Data resident on the training device (data.on_device): batched, seeded augmentation; a real run on the CPU."""
from __future__ import annotations

import pytest
import torch

from kdx.data import SyntheticDataModule
from kdx.data.device_batches import DeviceBatches, sample_hash, shift_and_flip
from kdx.errors import ConfigError

from conftest import compose_train


def test_shift_and_flip_crop_each_image_where_its_hash_says():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 2, 5, 7, generator=g)
    hashes = torch.tensor([0, 1, 7, 24, 25, 123456])
    out = shift_and_flip(images, hashes, pad=2)
    for b, h in enumerate(hashes.tolist()):
        di, dj, flip = h % 5, (h // 5) % 5, (h // 25) % 2
        padded = torch.nn.functional.pad(images[b], (2, 2, 2, 2))
        expected = padded[:, di:di + 5, dj:dj + 7]
        if flip:
            expected = expected.flip(-1)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=0)


def test_sample_hash_is_deterministic_and_spreads():
    idx = torch.arange(1000)
    h = sample_hash(3, 2, idx)
    assert torch.equal(h, sample_hash(3, 2, idx)) and not torch.equal(h, sample_hash(3, 1, idx))
    counts = torch.bincount(h % 25, minlength=25)  # the 25 shifts of pad=2 are about equally likely
    assert counts.min() > 20 and counts.max() < 70
    assert 400 < int(((h // 25) % 2).sum()) < 600


def test_device_batches_shuffle_per_epoch_shard_ranks_and_reproduce_views():
    images = torch.randint(0, 255, (10, 1, 6, 6), dtype=torch.uint8)
    kw = dict(mean=[0.5], std=[0.25], batch_size=4, train=True, augment=True, seed=1)
    one = DeviceBatches(images, torch.arange(10), **kw)
    one.set_epoch(0)
    first = list(one)
    assert sorted(torch.cat([b["index"] for b in first]).tolist()) == list(range(10))
    assert all(int(b["view"][0]) == 0 for b in first)
    again = list(one)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, again))  # same epoch, same images
    one.set_epoch(1)
    assert not torch.equal(torch.cat([b["index"] for b in list(one)]), torch.cat([b["index"] for b in first]))
    ranks = [DeviceBatches(images, torch.arange(10), rank=r, world=2, **kw) for r in (0, 1)]
    seen = [torch.cat([b["index"] for b in r]).tolist() for r in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(10)) and len(ranks[0]) == 2


def test_on_device_refuses_a_file_dataset():
    dm = SyntheticDataModule(on_device=True)
    with pytest.raises(ConfigError, match="data.on_device=true needs images held in memory.*reads list"):
        dm._device_batches([], True, False)


def test_a_run_with_data_on_the_device_learns(synthetic_teacher, tmp_path):
    from kdx.train import run_training

    common = ["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "trainer.max_epochs=3",
              "trainer.progress_bar=none"]
    resident = run_training(compose_train([*common, "+data.on_device=true", "distill.teacher_cache.mode=memory",
                                           "distill.teacher_cache.views=1"]), tmp_path / "resident")
    loader = run_training(compose_train(common), tmp_path / "loader")
    assert resident["status"] == "completed" and resident["metrics"]["test/acc1"] > 0.4  # chance: 0.25
    assert abs(resident["metrics"]["test/acc1"] - loader["metrics"]["test/acc1"]) < 0.15
