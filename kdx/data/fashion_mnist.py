"""Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey images of 10 clothing classes."""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

from kdx.data.base import KdxDataModule
from kdx.data.tensor_images import TensorImageDataset
from kdx.data.unlabeled import UNLABELED, keep_labels, load_image_tensor
from kdx.errors import DataError

CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = (0.2860,), (0.3530,)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a read-only numpy array.

    Decoded once per process and file version (path, size, mtime): the jobs of an in-process or pooled sweep
    share it instead of un-gzipping 30 MB each (~0.4 s a job on one core).
    """
    stat = Path(path).stat()
    return _read_idx(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_idx(path_str: str, size: int, mtime_ns: int) -> np.ndarray:
    path = Path(path_str)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; re-download Fashion-MNIST")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / "FashionMNIST" / "raw" / stem,
                      folder / "FashionMNIST" / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _holds_all(folder: Path) -> bool:
    return all(_find(folder, stem) for pair in FILES.values() for stem in pair)


def locate_fashion_mnist(root: str | None, download: bool) -> Path:
    """Folder holding the four IDX files.

    A `root` given (data.root) is the only place looked at: it holds the files, or with `download` they are
    downloaded there, else it is a DataError naming it (never a silent fall-back on another copy). Without
    one: $KDX_FMNIST_ROOT, Debian's package, ./data/fashion-mnist, then a torchvision download to the latter.
    """
    if root:
        folder = Path(root).expanduser()
        if _holds_all(folder):
            return folder
        if download:
            _download(folder, [folder])
            return folder
        raise DataError(f"data.root={root} does not hold the Fashion-MNIST IDX files ({', '.join(FILES['train'])}, "
                        f"...); point data.root at the folder that does, set data.download=true to fetch them there, "
                        f"or drop data.root to use the system copy")
    candidates = [Path(p).expanduser() for p in (os.environ.get("KDX_FMNIST_ROOT"), DEBIAN_DIR, "data/fashion-mnist") if p]
    for folder in candidates:
        if _holds_all(folder):
            return folder
    if download:
        target = Path("data/fashion-mnist")
        _download(target, candidates)
        return target
    raise DataError(f"Fashion-MNIST is not in {', '.join(map(str, candidates))}; run `apt-get install "
                    f"dataset-fashion-mnist`, set data.root, or set data.download=true")


def _download(target: Path, looked_in: list[Path]) -> None:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
    except Exception as e:  # no network, or the mirror is down
        raise DataError(f"Fashion-MNIST is not in {', '.join(map(str, looked_in))} and the download to {target} failed "
                        f"({e}); run `apt-get install dataset-fashion-mnist` or set data.root to a folder with the IDX "
                        f"files") from e
    if not _holds_all(target):
        raise DataError(f"the Fashion-MNIST download to {target} left the IDX files incomplete; remove {target} and "
                        f"try again, or set data.root to a folder with the files")


class FashionMNISTDataModule(KdxDataModule):
    """Fashion-MNIST from local IDX files; the 60k training images are split into train and val.

    `labeled_fraction` keeps the labels of that share of the training images; the rest are dropped, or, with
    `use_unlabeled`, kept with the label -1 for distillation (as are the images of an `unlabeled` folder).
    """

    def __init__(self, root: str | None = None, download: bool = True, val_size: int = 5000,
                 train_subset: int | None = None, test_subset: int | None = None, augment: bool = True,
                 seed: int = 0, labeled_fraction: float | None = None, use_unlabeled: bool = False,
                 unlabeled: str | None = None, **loader_kwargs) -> None:
        super().__init__(**loader_kwargs)
        self.root, self.download, self.val_size = root, download, int(val_size)
        self.train_subset, self.test_subset = train_subset, test_subset
        self.labeled_fraction, self.use_unlabeled, self.unlabeled = labeled_fraction, bool(use_unlabeled), unlabeled
        self.augment, self.seed = augment, int(seed)
        self.class_names, self.in_chans, self.image_size = list(CLASS_NAMES), 1, 28

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        folder = locate_fashion_mnist(self.root, self.download)
        load = lambda split: (torch.from_numpy(read_idx(_find(folder, FILES[split][0])).copy()).unsqueeze(1),  # noqa: E731
                              torch.from_numpy(read_idx(_find(folder, FILES[split][1])).astype(np.int64)))
        images, labels = load("train")
        test_images, test_labels = load("test")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size:]
        if self.train_subset:
            train_idx = train_idx[: int(self.train_subset)]
        train_images, train_labels = images[train_idx], keep_labels(labels[train_idx], self.labeled_fraction)
        if not self.use_unlabeled:  # supervised runs see the labelled images only
            keep = train_labels != UNLABELED
            train_images, train_labels = train_images[keep], train_labels[keep]
        if self.unlabeled:  # a folder of extra images, for distillation with the teacher's targets
            extra = load_image_tensor(self.unlabeled, self.image_size, self.in_chans)
            train_images = torch.cat([train_images, extra])
            train_labels = torch.cat([train_labels, torch.full((len(extra),), UNLABELED, dtype=train_labels.dtype)])
        if self.test_subset:
            test_images, test_labels = test_images[: int(self.test_subset)], test_labels[: int(self.test_subset)]
        self.train_set = TensorImageDataset(train_images, train_labels, MEAN, STD, augment=self.augment)
        self.val_set = TensorImageDataset(images[val_idx], labels[val_idx], MEAN, STD)
        self.test_set = TensorImageDataset(test_images, test_labels, MEAN, STD)
