"""InsightFace RecordIO (`train.rec` / `train.idx` / `property`) in pure Python, without MXNet.

File layout (MXNet / dmlc-core convention). A record is stored as one or more chunks:

    uint32 magic 0xCED7230A | uint32 lrec | payload bytes | zero padding to a multiple of 4

`lrec >> 29` is the continuation flag (0 = whole record, 1/2/3 = first/middle/last piece) and
`lrec & 0x1FFFFFFF` the piece length. The writer scans the payload at 4-byte-aligned positions and
splits it wherever the magic word appears; the word itself is dropped and the reader puts it back
between the pieces, so a payload may contain the magic number safely.

A payload starts with the header `<IfQQ` = (flag, label, id, id2). When `flag > 0`, `flag` float32
labels follow the header (the header's label field is then unused); the rest is the encoded image.

InsightFace datasets: record 0 has flag 2 and labels `[identity_start, identity_end]`; image
records have keys `1 .. identity_start - 1` (label = class index); records `identity_start ..
identity_end - 1` have flag 2 and labels `[first_image_key, end_image_key)` of one identity and no
image. The `.idx` file has one `key<TAB>byte offset` line per record; `property` holds
`num_classes,height,width`.
"""
from __future__ import annotations

import math
import os
import struct
from collections import namedtuple
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from kdx.data.fingerprint import files_fingerprint
from kdx.data.images import decode_image
from kdx.errors import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
_CHUNK = struct.Struct("<II")
_LEN_MASK = (1 << 29) - 1

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = "Record header: flag (number of float labels, or 0), label (float or float32 array), id, id2."


def pack_header(header: IRHeader | tuple, payload: bytes = b"") -> bytes:
    """Header bytes (+ float32 labels when the label is a sequence) followed by `payload`."""
    flag, label, id1, id2 = header
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _HEADER.pack(0, float(label), int(id1), int(id2)) + payload
    labels = np.asarray(label, dtype="<f4").ravel()
    return _HEADER.pack(len(labels), 0.0, int(id1), int(id2)) + labels.tobytes() + payload


def unpack_header(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into (IRHeader, rest); with flag > 0 the label is a float32 array of `flag` values."""
    if len(record) < _HEADER.size:
        raise DataError(f"RecordIO record of {len(record)} bytes is shorter than its 24-byte header; the .rec file is damaged")
    flag, label, id1, id2 = _HEADER.unpack_from(record, 0)
    rest = record[_HEADER.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise DataError(f"RecordIO record announces {flag} labels but holds only {len(rest)} bytes after its header")
        label = np.frombuffer(rest[: 4 * flag], dtype="<f4").copy()
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id1, id2), rest


def _encode_chunks(payload: bytes) -> bytes:
    """The on-disk chunks of one record, split at 4-byte-aligned magic words as MXNet's writer does."""
    if len(payload) >= 1 << 29:
        raise DataError(f"a RecordIO record must be smaller than 512 MiB, got {len(payload)} bytes")
    out = bytearray()
    n = len(payload)
    lower = n - n % 4
    start = 0
    pos = payload.find(_MAGIC_BYTES)
    while 0 <= pos < lower:
        if pos % 4 == 0:
            flag = 1 if start == 0 else 2
            out += _CHUNK.pack(MAGIC, (flag << 29) | (pos - start)) + payload[start:pos]
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    flag = 3 if start else 0
    out += _CHUNK.pack(MAGIC, (flag << 29) | (n - start)) + payload[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


class RecordIOWriter:
    """Append records to a `.rec` file and, when given `idx_path`, write `key<TAB>offset` lines."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        """Open `rec_path` for writing (truncates it)."""
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w") if self.idx_path is not None else None
        self._keys: set[int] = set()

    def write(self, payload: bytes, key: int | None = None) -> int:
        """Write one record and return its byte offset; `key` goes to the .idx file."""
        offset = self._rec.tell()
        self._rec.write(_encode_chunks(bytes(payload)))
        if self._idx is not None:
            if key is None:
                raise DataError(f"writing {self.idx_path} needs a key for every record; pass key=")
            if key in self._keys:
                raise DataError(f"key {key} is written twice to {self.idx_path}; keys must be unique")
            self._keys.add(key)
            self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def sync(self) -> None:
        """Flush both files to disk (before they are renamed into place)."""
        for f in (self._rec, self._idx):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> None:
        """Flush and close the files."""
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordIOReader:
    """Read records of a `.rec` file by key (through its `.idx`) or in file order."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        """Open `rec_path`; with `idx_path` (or a `.idx` next to it when idx_path="auto") keys are random access."""
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise DataError(f"RecordIO file {self.rec_path} does not exist; check the path")
        if idx_path == "auto":
            guess = self.rec_path.with_suffix(".idx")
            idx_path = guess if guess.is_file() else None
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._file = None
        self._size = self.rec_path.stat().st_size
        self.offsets: dict[int, int] = {}
        if self.idx_path is not None:
            self.offsets = self._read_idx(self.idx_path)
        else:
            self.offsets = {i: off for i, off in enumerate(self._scan_offsets())}
        self.keys = list(self.offsets)

    def _read_idx(self, path: Path) -> dict[int, int]:
        if not path.is_file():
            raise DataError(f"index file {path} does not exist; pass idx_path=None to read {self.rec_path} in order")
        offsets: dict[int, int] = {}
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    key, off = int(parts[0]), int(parts[1])
                except (ValueError, IndexError):
                    raise DataError(f"{path} line {lineno} is not `key<TAB>offset`: {line.strip()!r}") from None
                offsets[key] = off
        return offsets

    def _fh(self):
        if self._file is None:  # opened lazily so the reader survives pickling into DataLoader workers
            self._file = open(self.rec_path, "rb")
        return self._file

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def _read_at(self, offset: int, from_idx: bool = False) -> tuple[bytes, int]:
        """The record starting at `offset` and the offset after it."""
        f = self._fh()
        f.seek(offset)
        parts: list[bytes] = []
        pos = offset
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise DataError(f"{self.rec_path} ends inside a record at byte offset {pos}; the file is truncated")
            magic, lrec = _CHUNK.unpack(head)
            if magic != MAGIC:
                where = f" (offset from {self.idx_path})" if from_idx and pos == offset else ""
                raise DataError(f"{self.rec_path} has no RecordIO magic number at byte offset {pos}{where}; "
                                "the file is not RecordIO or the .idx does not belong to it")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = f.read(length + (-length % 4))
            if len(data) < length:
                raise DataError(f"{self.rec_path} ends inside a record at byte offset {pos}; the file is truncated")
            parts.append(data[:length])
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts), pos
            if cflag not in (1, 2):
                raise DataError(f"{self.rec_path} has an unknown chunk flag {cflag} at byte offset {pos}")

    def _scan_offsets(self) -> Iterator[int]:
        pos = 0
        while pos < self._size:
            yield pos
            _, pos = self._read_at(pos)

    def __len__(self) -> int:
        """Number of records (keys in the .idx, or records in the file without one)."""
        return len(self.offsets)

    def read(self, key: int) -> bytes:
        """The payload of the record with `key` (the record's position when there is no .idx)."""
        try:
            offset = self.offsets[int(key)]
        except KeyError:
            raise DataError(f"key {key} is not in {self.idx_path or self.rec_path}") from None
        if offset < 0 or offset >= self._size:
            raise DataError(f"{self.idx_path} gives key {key} the offset {offset}, outside {self.rec_path} "
                            f"({self._size} bytes); rebuild the .idx")
        return self._read_at(offset, from_idx=self.idx_path is not None)[0]

    def __iter__(self) -> Iterator[bytes]:
        """Payloads in file order."""
        pos = 0
        while pos < self._size:
            rec, pos = self._read_at(pos)
            yield rec

    @staticmethod
    def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
        """Split a payload into (header, image bytes)."""
        return unpack_header(payload)

    def close(self) -> None:
        """Close the file handle."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _whole_number(value, source: str, what: str) -> int:
    """`value` as a non-negative int, or a DataError naming `source` when it is NaN, infinite, fractional or negative."""
    value = float(value)
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise DataError(f"{source} has {what} {value!r}, which is not a whole number >= 0; the .rec file is damaged "
                        f"or was not written for kdx/InsightFace (repack it with kdx-pack)")
    return int(value)


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """(num_classes, height, width) from an InsightFace `property` file."""
    path = Path(path)
    try:
        values = [int(v) for v in path.read_text().strip().split(",")]
        num_classes, h, w = values[:3]
    except (OSError, ValueError):
        raise DataError(f"{path} must exist and hold `num_classes,height,width`") from None
    return num_classes, h, w


class RecordFaceDataset(Dataset):
    """Face images and identity labels from an InsightFace folder with train.rec, train.idx, property."""

    def __init__(self, rec_dir: str | os.PathLike, transform: Callable | None = None):
        """Index `rec_dir`; `transform` maps an RGB PIL image to a tensor (default: uint8->float [0,1] CHW)."""
        self.rec_dir = Path(rec_dir)
        if not self.rec_dir.is_dir():
            raise DataError(f"RecordIO folder {self.rec_dir} does not exist; it must hold train.rec and train.idx")
        self.reader = RecordIOReader(self.rec_dir / "train.rec", self.rec_dir / "train.idx")
        self.transform = transform
        prop = self.rec_dir / "property"
        self.num_classes, self.height, self.width = read_property(prop) if prop.is_file() else (None, None, None)
        header0, _ = unpack_header(self.reader.read(0)) if 0 in self.reader.offsets else (None, b"")
        if header0 is not None and header0.flag > 0:
            end = _whole_number(header0.label[0], f"the header record (key 0) of {self.reader.rec_path}",
                                "the first identity record's key")
            self.keys = list(range(1, end))
        else:
            self.keys = sorted(self.reader.keys)  # no InsightFace header record: every record is an image
        if self.num_classes is None:
            self.num_classes = 1 + max(int(self._label(k)) for k in self.keys) if self.keys else 0

    def _label_of(self, header: IRHeader, key: int) -> int:
        """The record's identity label, checked: a whole number in [0, num_classes)."""
        label = _whole_number(header.label if header.flag == 0 else header.label[0],
                              f"record {key} of {self.reader.rec_path}", "its identity label")
        if self.num_classes is not None and label >= self.num_classes:
            raise DataError(f"record {key} of {self.reader.rec_path} has identity label {label}, but the property "
                            f"file says there are {self.num_classes} identities; repack the dataset (kdx-pack)")
        return label

    def _label(self, key: int) -> int:
        header, _ = unpack_header(self.reader.read(key))
        return self._label_of(header, key)

    def fingerprint(self) -> str:
        """Size and modification time of train.rec, train.idx and property (kdx.data.fingerprint)."""
        files = [p for p in (self.reader.rec_path, self.reader.idx_path, self.rec_dir / "property") if p is not None]
        return files_fingerprint(files)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image tensor, identity label)."""
        key = self.keys[index]
        header, data = unpack_header(self.reader.read(key))
        label = self._label_of(header, key)
        img = decode_image(data, 3, name=f"record {key} of {self.reader.rec_path}")
        if self.transform is not None:
            return self.transform(img), label
        arr = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # an RGB image: H x W x 3 uint8
        return arr.float().div_(255.0), label
