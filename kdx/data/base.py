"""What every kdx classification datamodule shares: loaders, class names and the shape of its images."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from kdx.data.device_batches import DeviceBatches
from kdx.data.fingerprint import dataset_fingerprint
from kdx.data.mixing import MixSpec, check_mix, check_teacher_view
from kdx.data.samplers import BalancedSampler, check_sampler, dataset_labels
from kdx.data.tensor_images import TensorImageDataset
from kdx.data.views import ViewRecords, ViewSampler
from kdx.errors import ConfigError


class IndexedRecords(Dataset):
    """Training records (kdx.data.batch) of a dataset of (image, label) items: images, labels and the index."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        image, label = (item[0], item[1]) if isinstance(item, tuple) else (item, -1)
        return {"images": image, "labels": torch.as_tensor(label), "index": torch.tensor(int(i))}


class KdxDataModule(pl.LightningDataModule):
    """A LightningDataModule that exposes `num_classes`, `in_chans`, `image_size` and `class_names`."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = True, eval_batch_size: int | None = None, seeded_views: bool = False,
                 views: int | None = None, on_device: bool = False, sampler: str | None = None,
                 mix: dict | MixSpec | None = None, teacher_view: str = "consistent", view_seed: int = 0) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.class_names: list[str] = []
        self.in_chans: int = 3
        self.image_size: int = 32
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        # batch mixing (mixup/cutmix) and what the teacher sees (kdx.data.mixing): both need seeded views
        self.mix = check_mix(mix)
        self.teacher_view = check_teacher_view(teacher_view)
        # seeded views (kdx.data.views): each training image's augmentation (and mix) a function of
        # (view_seed, view, index); view = epoch, or epoch % view_count. Decided here, once: kdx.train passes the
        # run's seed as view_seed, and seeded_views/views when the teacher cache is on (kdx.tasks.Task.data_options)
        self.seeded_views = bool(seeded_views) or self.mix.active or self.teacher_view != "consistent"
        self.view_count: int | None = int(views) if views else None
        self.view_seed = int(view_seed)  # also the balanced sampler's seed
        self.on_device = bool(on_device)  # keep in-memory images on the training device, augment them there
        self.sampler = check_sampler(sampler)  # None: shuffle; "balanced": each class (identity) equally likely

    @property
    def num_classes(self) -> int:
        """Number of classes, known after `setup()`."""
        return len(self.class_names)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for loaders")
        drop_last = train and len(dataset) > self.batch_size
        if self.on_device:
            return self._device_batches(dataset, train, drop_last)
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size if train else self.eval_batch_size, drop_last=drop_last,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
        )
        if train and self.sampler and self.seeded_views:
            raise ConfigError("data.sampler=balanced cannot be combined with seeded views (the teacher cache, "
                              "data.seeded_views); set data.sampler=null or distill.teacher_cache.mode=off")
        if train and self.seeded_views:
            sampler = ViewSampler(dataset, seed=self.view_seed, views=self.view_count, drop_last=drop_last)
            records = ViewRecords(dataset, self.view_seed, self.mix, self.teacher_view,
                                  clean=self.clean_train_set() if self.teacher_view == "fixed" else None)
            return DataLoader(records, sampler=sampler, **kwargs)
        balanced = BalancedSampler(dataset_labels(dataset), seed=self.view_seed) if train and self.sampler else None
        if train:
            dataset = IndexedRecords(dataset)
        return DataLoader(dataset, shuffle=train and balanced is None, sampler=balanced, **kwargs)

    def _device_batches(self, dataset: Dataset, train: bool, drop_last: bool) -> DeviceBatches:
        """Resident batches on the trainer's device (data.on_device=true); the views are always seeded."""
        if self.sampler:
            raise ConfigError("data.sampler=balanced is not available with data.on_device=true; set one of them off")
        if not isinstance(dataset, TensorImageDataset):
            raise ConfigError(f"data.on_device=true needs images held in memory (fmnist, synthetic), but "
                              f"{type(self).__name__} reads {type(dataset).__name__}; set data.on_device=false")
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None and train else (0, 1)
        return DeviceBatches(dataset.images, dataset.labels, dataset.mean.flatten().tolist(),
                             dataset.std.flatten().tolist(), self.batch_size if train else self.eval_batch_size,
                             device=device, train=train, augment=dataset.augment and train, pad=dataset.pad,
                             seed=self.view_seed, views=self.view_count, drop_last=drop_last, rank=rank, world=world,
                             mix=self.mix, teacher_view=self.teacher_view)

    def clean_train_set(self) -> Dataset:
        """The training images without augmentation (what a `fixed` teacher sees, data.teacher_view=fixed)."""
        clean = getattr(self.train_set, "without_augmentation", None)
        if clean is None:
            raise ConfigError(f"data.teacher_view=fixed shows the teacher the clean training image, which "
                              f"{type(self.train_set).__name__} cannot give (it has no without_augmentation()); "
                              "use data.teacher_view=consistent or independent")
        return clean()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, train=False)

    def describe(self) -> dict[str, Any]:
        """Sizes and shapes, for results.json and logs."""
        size = lambda d: len(d) if d is not None else 0  # noqa: E731
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, "image_size": self.image_size,
                "train": size(self.train_set), "val": size(self.val_set), "test": size(self.test_set)}

    def data_fingerprint(self) -> str | None:
        """A short hash of what the training set holds today (kdx.data.fingerprint), known after `setup()`: it
        changes when images are replaced in place, so the teacher cache never serves outputs of other images.
        None when the training set does not say (a dataset without `fingerprint()` or a `samples` list)."""
        return dataset_fingerprint(self.train_set)
