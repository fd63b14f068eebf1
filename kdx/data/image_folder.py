"""ImageNet-style class folders: `train/`, `val/`, `test/`, or one folder split by a seeded stratified split."""
from __future__ import annotations

import random
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from kdx.data.base import KdxDataModule
from kdx.data.images import decode_image, scan_class_folders
from kdx.data.transforms import build_transforms
from kdx.errors import DataError
from kdx.schemas import number

BAD_IMAGE_HINT = "replace or delete the file, or set data.bad_images=skip to skip unreadable files"


class ImageListDataset(Dataset):
    """(path, label) samples read with PIL and transformed; unreadable files fail with their path."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable | None, in_chans: int = 3) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = decode_image(path, self.in_chans, name=f"image {path}", hint=BAD_IMAGE_HINT)
        return (self.transform(img) if self.transform else img), label


def stratified_split(samples: Sequence[tuple[Path, int]], fractions: Sequence[float], seed: int) -> list[list]:
    """Split samples into parts with the given fractions per class, reproducibly for a seed."""
    by_class: dict[int, list] = defaultdict(list)
    for s in samples:
        by_class[s[1]].append(s)
    parts: list[list] = [[] for _ in fractions]
    rng = random.Random(seed)
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n, start = len(items), 0
        for i, frac in enumerate(fractions):
            count = n - start if i == len(fractions) - 1 else min(n - start, max(1 if frac > 0 else 0, round(frac * n)))
            parts[i].extend(items[start:start + count])
            start += count
    return parts


class ImageFolderDataModule(KdxDataModule):
    """Class folders on disk. With `train/` (and `val/`, `test/`) subfolders they are used as given;
    otherwise `root` itself holds the class folders and is split by `val_split`/`test_split`."""

    # checked with the config, before any work (kdx.schemas.check_arguments)
    CONFIG_BOUNDS = {"image_size": number(224, 1), "val_split": number(0.1, 0, 1, high_open=True),
                     "test_split": number(0.1, 0, 1, high_open=True)}

    def __init__(self, root: str, image_size: int = 224, in_chans: int = 3, val_split: float = 0.1,
                 test_split: float = 0.1, seed: int = 0, augment: str = "auto", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, bad_images: str = "fail", **loader_kwargs) -> None:
        super().__init__(**loader_kwargs)
        if bad_images not in ("fail", "skip"):
            raise DataError(f"data.bad_images must be 'fail' or 'skip', got {bad_images!r}")
        self.root = Path(root).expanduser()
        self.image_size, self.in_chans = int(image_size), int(in_chans)
        self.val_split, self.test_split, self.seed = float(val_split), float(test_split), int(seed)
        self.augment, self.mean, self.std, self.bad_images = augment, mean, std, bad_images
        self.skipped: list[Path] = []

    def _samples(self, folders: dict[str, list[Path]], split_dir: Path) -> list[tuple[Path, int]]:
        index = {c: i for i, c in enumerate(self.class_names)}
        unknown = sorted(set(folders) - set(index))
        if unknown:
            raise DataError(f"{split_dir} has class folders {unknown} that train/ lacks; "
                            f"every split must use the classes of train/")
        return [(p, index[c]) for c in folders for p in folders[c]]

    def _drop_unreadable(self, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        if self.bad_images != "skip":
            return samples
        kept = []
        for path, label in samples:
            try:
                decode_image(path, self.in_chans, name=f"image {path}", hint=BAD_IMAGE_HINT)
                kept.append((path, label))
            except DataError:
                self.skipped.append(path)
        return kept

    @staticmethod
    def _check_classes(folders: dict[str, list[Path]], where: Path) -> None:
        if len(folders) < 2:
            found = f"only the class folder {next(iter(folders))!r}" if folders else "no class folder"
            raise DataError(f"{where} has {found}; a classifier needs at least two classes, so add a subfolder of "
                            f"images per class (or point data.root at the folder above)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist; set data.root to a folder of class subfolders")
        train_dir = self.root / "train"
        if train_dir.is_dir():
            folders = scan_class_folders(train_dir)
            self._check_classes(folders, train_dir)
            self.class_names = sorted(folders)
            train = self._samples(folders, train_dir)
            splits = {}
            for name in ("val", "test"):
                d = self.root / name
                splits[name] = self._samples(scan_class_folders(d), d) if d.is_dir() else None
            if splits["val"] is None:
                train, splits["val"] = stratified_split(train, [1 - self.val_split, self.val_split], self.seed)
            val, test = splits["val"], splits["test"]
        else:
            folders = scan_class_folders(self.root)
            self._check_classes(folders, self.root)
            self.class_names = sorted(folders)
            everything = self._samples(folders, self.root)
            train_frac = 1 - self.val_split - self.test_split
            if train_frac <= 0:
                raise DataError(f"data.val_split + data.test_split must be < 1, got {self.val_split} + {self.test_split}")
            train, val, test = stratified_split(everything, [train_frac, self.val_split, self.test_split], self.seed)
        train, val = self._drop_unreadable(train), self._drop_unreadable(val)
        test = self._drop_unreadable(test) if test else None
        if self.skipped:  # one warning for the three splits
            warnings.warn(f"skipped {len(self.skipped)} unreadable image(s) under {self.root}, e.g. {self.skipped[0]}")
        tf = lambda is_train: build_transforms(self.image_size, self.in_chans, is_train, self.augment,  # noqa: E731
                                               self.mean, self.std)
        self.train_set = ImageListDataset(train, tf(True), self.in_chans)
        self.val_set = ImageListDataset(val, tf(False), self.in_chans)
        self.test_set = ImageListDataset(test, tf(False), self.in_chans) if test else None
