"""What a dataset holds, cheaply: a short hash that changes when its images change (the teacher cache's key).

A config names where the data is and how it is transformed, not what the files hold today: replacing a folder's
images in place keeps the config and the sizes. The fingerprint covers the contents:
- datasets of files (a `samples` list of (path, label), as image and face folders have): every file's path,
  size and modification time (nanoseconds) and the labels; one stat per file, no reading;
- datasets that know their files or tensors answer `fingerprint()` themselves (in-memory images: a hash of the
  bytes, ~0.1 s for Fashion-MNIST's 43 MB; RecordIO: the size and modification time of its files);
- Subset and ConcatDataset: their parts, in order.
A file replaced by one of the same size and modification time (`cp -p`, `rsync -a` of different files with
equal sizes) is not noticed; anything else is.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset


def _digest(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:24]


def files_fingerprint(paths: Iterable[str | os.PathLike], labels: Iterable[Any] | None = None) -> str:
    """A hash of each file's path, size and modification time (and its label, where given), in order."""
    h = hashlib.blake2b(digest_size=16)
    labels = list(labels) if labels is not None else None
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
            h.update(f"{os.fspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:  # gone or unreadable: still part of the identity, and never equal to a readable file
            h.update(f"{os.fspath(path)}\0missing\0".encode())
        if labels is not None:
            h.update(f"{labels[i]}\n".encode())
    return _digest(h)


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """A hash of the tensors' shapes, dtypes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return _digest(h)


def dataset_fingerprint(dataset: Dataset | None) -> str | None:
    """The dataset's fingerprint, or None when it does not say what it holds (no `fingerprint()`, no `samples`)."""
    if dataset is None:
        return "none"
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return own()
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        return None if inner is None else _digest(hashlib.blake2b(
            f"{inner}\0{list(map(int, dataset.indices))}".encode(), digest_size=16))
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_fingerprint(d) for d in dataset.datasets]
        return None if None in parts else _digest(hashlib.blake2b("\0".join(parts).encode(), digest_size=16))
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, (list, tuple)) and all(isinstance(s, (list, tuple)) and len(s) >= 2 for s in samples):
        return files_fingerprint([s[0] for s in samples], [s[1] for s in samples])
    return None
