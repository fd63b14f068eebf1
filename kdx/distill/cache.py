"""The teacher cache: a frozen teacher's outputs per (sample, view), computed once and shared by every job.

Neither the temperature nor alpha changes what the teacher says about an image, so a sweep over them needs
the teacher's outputs once per augmented view, not once per job and epoch. With seeded views
(kdx.data.views) a view is a function of (seed, view, index) alone, so an entry is addressed by
(index, view) and is valid in any run whose teacher, data, transforms and seed are the same: the store's
key hashes all of them, and a change to any of them opens another store.

Stores hold float16 rows with a power-of-two scale per row (so a row keeps float16's relative precision at
any magnitude: a finite teacher output beyond float16's +-65504 stays finite), or, with `topk`, float32 rows of
the k largest log-probabilities and their classes, the rest of the probability mass spread evenly. `memory`
keeps them in the process; `disk` in files under `dir`, shared by parallel jobs, on one machine or on several
nodes of a cluster whose shared filesystem ignores file locks (NFS without lockd, FUSE and object-store mounts).

The disk store takes no lock at all; its correctness rests on three things every such filesystem honours:
- **Self-checking records.** Each entry is one record in `records.bin`: a 16-byte keyed BLAKE2b tag, then the
  entry's rows of every output. The tag is keyed by the store's key and its generation (a random name chosen
  when the store's meta.json is published) and covers the entry's (index, view) and its rows, and a reader
  serves exactly the bytes it checked, never a second read. A record that is empty (a hole of the sparse file),
  torn (a writer killed mid-write, a write seen half-done by a reader, two writers' bytes interleaved), moved to
  another entry, or left by another store or an older generation fails its tag (a 2**-128 chance of passing), and
  the reader computes the teacher itself. Writers may race on one entry: each writes a whole record of the
  same teacher output, so whichever bytes a reader gets either pass as a complete row or are recomputed.
- **Exclusive creates for claims.** A job about to compute an entry creates `claims/<entry>` with O_CREAT|O_EXCL
  (exclusive on local filesystems and NFSv3+), holding its node, process and time; others wait for the record
  instead of computing it too. The claim is removed once the record is written. A claim by a process that is
  gone (same node), or older than CLAIM_TIMEOUT_S (any node), is taken over by renaming it away first, so only
  one of the processes that found it stale wins it. Claims only save work: if a filesystem lets two jobs claim
  one entry, both compute it and both write a whole record, and the tags keep every read correct.
- **Atomic publication of the store.** meta.json is written to a unique temporary file, fsynced, then hard-linked
  to its name, which fails if another process published first (where hard links are not supported it is renamed
  into place, and the last writer's meta wins); every creator then reads the one published meta.json and uses
  its generation and view count. A damaged meta.json is replaced (one warning) by one with a new generation, so
  no record of the old one is served, and no file is ever deleted, truncated or shrunk under another process
  (files only grow, by ftruncate to the size a store needs).

Disk stores are sparse files read with `os.pread` and written with `os.pwrite`, never through a memory
mapping: when the filesystem is full, a page fault in a mapping of a sparse file is a SIGBUS that kills the
process (on tmpfs even a read of a hole allocates a page), while pwrite raises ENOSPC, which stops the
storing (one warning) and lets the run go on computing the teacher.
Stores written before records.bin (state.bin, crc.bin, owner.bin, out-*.bin under the same key) keep their
meta.json and are refilled once into records.bin; their old files are not read and may be deleted.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import struct
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from kdx.distill.settings import check_settings
from kdx.errors import KdxError
from kdx.io import fsync_dir, sidecar_path

CLAIM_TIMEOUT_S = 120.0  # a claim older than this (any node), or by a process that is gone (this node), is taken over
TAG_BYTES = 16  # the keyed BLAKE2b tag in front of each record
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
RECORDS_FILE = "records.bin"
CLAIMS_DIR = "claims"


def _node_name() -> str:
    """This machine, as claims name it: the host name and the kernel's boot id (process ids mean something only
    on the node, and boot, that issued them)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}/{boot}".encode()).hexdigest()[:16]


NODE = _node_name()


class CacheUnavailable(KdxError):
    """The store cannot be used (unwritable folder, another teacher's store); the teacher is computed instead."""


def check_cache_config(cfg: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The `distill.teacher_cache` section with defaults filled in (kdx.distill.settings, the one schema and default
    of each key); bad values are a ConfigError naming the key."""
    return check_settings({"teacher_cache": cfg}).teacher_cache.as_dict()


def default_cache_dir() -> Path:
    """$KDX_CACHE_DIR, else ~/.cache/kdx/teacher (shared by every run and sweep job of this user)."""
    return Path(os.environ.get("KDX_CACHE_DIR") or Path.home() / ".cache" / "kdx" / "teacher")


def teacher_fingerprint(teacher: nn.Module | None, extra_file: str | os.PathLike | None = None) -> str:
    """SHA-256 of a network's state (names, shapes, dtypes, values) or of a model file (ONNX teachers), with the
    file's kdx-export description `<model>.json` when there is one (the input normalisation it records decides
    what the teacher sees)."""
    h = hashlib.sha256()
    if extra_file is not None:
        with open(extra_file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        side = sidecar_path(extra_file)
        if side.is_file():
            h.update(b"description:" + side.read_bytes())
    if teacher is not None:
        for name, value in sorted(teacher.state_dict().items()):
            h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(teacher_hash: str, data: Mapping[str, Any], seed: int, views: int | None, topk: int | None,
              outputs: Mapping[str, int]) -> str:
    """The store's name: a hash of teacher, data source and transforms, seed, view scheme and stored outputs."""
    blob = json.dumps({"teacher": teacher_hash, "data": data, "seed": int(seed), "views": views, "topk": topk,
                       "outputs": dict(outputs), "format": 2}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _compress(row: np.ndarray, k: int) -> np.ndarray:
    """[top-k log-probabilities, their classes, log of the mass left to each other class] of one logits row."""
    logp = row - np.logaddexp.reduce(row)
    top = np.argsort(-logp, kind="stable")[:k]
    rest_mass = max(1.0 - float(np.exp(logp[top]).sum()), 1e-30)
    others = max(row.shape[0] - k, 1)
    return np.concatenate([logp[top], top.astype(np.float32), [np.log(rest_mass / others)]]).astype(np.float32)


def _expand(packed: np.ndarray, k: int, width: int) -> np.ndarray:
    """Logits (log-probabilities) of a row packed by `_compress`."""
    row = np.full(width, packed[2 * k], dtype=np.float32)
    row[packed[k:2 * k].astype(np.int64)] = packed[:k]
    return row


def _exponents(rows: np.ndarray) -> np.ndarray:
    """Per row, the smallest e >= 0 with max |finite value| * 2**-e within float16's range."""
    finite = np.where(np.isfinite(rows), np.abs(rows), 0.0).astype(np.float64)
    peak = finite.max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    e = np.zeros(rows.shape[0], np.int32)
    big = peak > FLOAT16_MAX
    e[big] = np.ceil(np.log2(peak[big] / FLOAT16_MAX)).astype(np.int32)
    # rounding to float16 may still carry a value just over the limit to inf: one more step for those rows
    scaled = np.ldexp(np.where(np.isfinite(rows), rows, 0.0), -e[:, None]).astype(np.float16)
    e[~np.isfinite(scaled).all(axis=1)] += 1
    return e


def encode_rows(rows: np.ndarray) -> np.ndarray:
    """float32 rows as float16 [row * 2**-e, e]: float16's precision without its range limit (e = 0 in range)."""
    rows = np.asarray(rows, np.float32)
    e = _exponents(rows)
    scaled = np.ldexp(rows, -e[:, None]).astype(np.float16)
    return np.concatenate([scaled, e[:, None].astype(np.float16)], axis=1)


def decode_rows(stored: np.ndarray) -> np.ndarray:
    """The float32 rows of `encode_rows`."""
    stored = np.asarray(stored)
    return np.ldexp(stored[:, :-1].astype(np.float32), stored[:, -1].astype(np.int32)[:, None]).astype(np.float32)



class _Column:
    """One array of a store, indexed by entry: in memory a numpy array; on disk a sparse file read with
    os.pread and written with os.pwrite, never through a memory mapping (see the module docstring: on a full
    filesystem a mapping's page fault is a SIGBUS, even a read of a hole on tmpfs, while pread/pwrite return
    zeros or raise ENOSPC)."""

    def __init__(self, array: np.ndarray | None = None, fd: int | None = None, dtype=None,
                 shape: tuple[int, ...] = ()):
        self.array, self.fd = array, fd
        self.dtype = np.dtype(array.dtype if array is not None else dtype)
        self.shape = tuple(array.shape if array is not None else shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, at):
        if self.fd is None:
            return self.array[at]
        scalar = np.ndim(at) == 0
        pos = np.atleast_1d(np.asarray(at, dtype=np.int64))
        unique, inverse = np.unique(pos, return_inverse=True)
        rows = np.zeros((len(unique), *self.shape[1:]), self.dtype)
        flat = rows.reshape(len(unique), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1  # one pread per run of consecutive entries
        for run in np.split(np.arange(len(unique)), breaks):
            if not len(run):
                continue
            want = len(run) * self.row_bytes
            got = os.pread(self.fd, want, int(unique[run[0]]) * self.row_bytes)
            flat[run[0]:run[0] + len(got) // self.row_bytes] = np.frombuffer(
                got[:len(got) // self.row_bytes * self.row_bytes], np.uint8).reshape(-1, self.row_bytes)
        out = rows[inverse.reshape(-1)]
        return out[0] if scalar else out

    def put(self, pos: int, value) -> None:
        value = np.array(np.broadcast_to(np.asarray(value, self.dtype), self.shape[1:]), order="C")
        if self.fd is None:
            self.array[pos] = value
            return
        data = memoryview(value.tobytes())
        offset = int(pos) * self.row_bytes
        while data:
            written = os.pwrite(self.fd, data, offset)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data, offset = data[written:], offset + written

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None



def _meta_temp(meta_path: Path, description: Mapping[str, Any]) -> Path:
    """meta.json's content in a temporary file of this process's own (fsynced), ready to be published."""
    tmp = meta_path.with_name(f".meta.{NODE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(description, indent=1, sort_keys=True, default=str))
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _publish_meta(meta_path: Path, description: Mapping[str, Any], replace: bool = False) -> None:
    """Publish meta.json whole: hard-linked into place, which fails if another process published first (then
    theirs stands), or with `replace` (a damaged one) or where hard links are not supported, renamed over it."""
    tmp = _meta_temp(meta_path, description)
    try:
        if not replace:
            try:
                os.link(tmp, meta_path)
                return
            except FileExistsError:
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK,
                                   errno.EXDEV):
                    raise
        os.replace(tmp, meta_path)
    finally:
        tmp.unlink(missing_ok=True)
        fsync_dir(meta_path.parent)


def _read_meta(meta_path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(meta.json's content, None), or (None, why it cannot be used) for an empty or damaged file."""
    try:
        text = meta_path.read_text()
    except UnicodeDecodeError:
        return None, "it is not text"
    if not text.strip():
        return None, "it is empty"
    try:
        found = json.loads(text)
    except ValueError as e:
        return None, f"it is not valid JSON ({e})"
    if not isinstance(found, dict):
        return None, f"it holds a {type(found).__name__}, not a mapping"
    return found, None



class TeacherCache:
    """Teacher outputs by (sample index, view); `cache(x, indices, views, compute)` serves hits, computes misses."""

    def __init__(self, key: str, num_samples: int, num_views: int, outputs: Mapping[str, int], mode: str = "memory",
                 root: str | os.PathLike | None = None, topk: int | None = None, meta: Mapping[str, Any] | None = None):
        self.key, self.num_samples, self.num_views = key, int(num_samples), int(num_views)
        self.outputs = dict(outputs)  # name -> width of its row
        self.topk = {n: min(int(topk), w) for n, w in self.outputs.items() if topk and n == "logits" and w > topk}
        # top-k rows hold class indices and log-probabilities: float32 (float16 is exact only up to 2048 and
        # overflows below -65504); full rows: float16 plus one column for the row's power-of-two scale
        self.cols = {n: (2 * self.topk[n] + 1 if n in self.topk else w + 1) for n, w in self.outputs.items()}
        self.dtypes = {n: np.dtype(np.float32 if n in self.topk else np.float16) for n in self.outputs}
        self.row_bytes = {n: self.cols[n] * self.dtypes[n].itemsize for n in self.cols}
        self.record_bytes = TAG_BYTES + sum(self.row_bytes.values())
        self.mode = mode
        self.hits = self.misses = 0  # since the last reset (the host logs the epoch's hit rate and resets them)
        self.run_hits = self.run_misses = 0  # over the whole run, never reset: the run's closing summary
        self.writable = True
        self.claims: Path | None = None
        if mode == "memory":
            self.dir = None
            self.generation = ""
            self.records = _Column(np.zeros((self.num_samples * self.num_views, self.record_bytes), np.uint8))
            self._keyed()
            return
        self.dir = Path(root or default_cache_dir()) / key
        description = {"key": key, "num_samples": self.num_samples, "num_views": self.num_views,
                       "outputs": self.outputs, "topk": topk, **dict(meta or {})}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            found = self._agree_on_meta(description)
            if found.get("num_views", 0) > self.num_views and all(
                    found.get(k) == description[k] for k in ("key", "num_samples", "outputs")):
                # a longer run of the same key built it: its first views are this run's (a view is a
                # function of (seed, view, index)), so a shorter schedule reads the same store
                self.num_views = description["num_views"] = int(found["num_views"])
            if any(found.get(k) != description[k] for k in ("key", "num_samples", "num_views", "outputs")):
                raise CacheUnavailable(f"teacher cache {self.dir} was built for another teacher or data "
                                       f"({found.get('num_samples')} samples x {found.get('num_views')} "
                                       "views); delete it or set distill.teacher_cache.dir elsewhere")
            # stores published before generations existed have none: their records are keyed by the key alone
            self.generation = str(found.get("generation", ""))
            self._keyed()
            self.claims = self.dir / CLAIMS_DIR
            self.claims.mkdir(exist_ok=True)
            self.records = self._open(RECORDS_FILE, self.num_samples * self.num_views)
        except OSError as e:
            raise CacheUnavailable(f"teacher cache folder {self.dir} cannot be written ({e.strerror or e}); set "
                                   "distill.teacher_cache.dir to a writable folder or distill.teacher_cache.mode=memory"
                                   ) from None

    # ------------------------------------------------------------------ the store's files
    def _agree_on_meta(self, description: dict[str, Any]) -> dict[str, Any]:
        """The one published meta.json of this store, publishing ours (with a new generation) if there is none
        and replacing a damaged one (one warning); concurrent creators all end up reading the same file."""
        meta_path = self.dir / "meta.json"
        warned = False
        for _ in range(5):
            try:
                found, damage = _read_meta(meta_path)
            except FileNotFoundError:
                _publish_meta(meta_path, {**description, "generation": uuid.uuid4().hex})
                continue
            if found is not None:
                return found
            # a full disk or an outside hand left it so: a new generation, so none of its records is served
            if not warned:
                warnings.warn(f"teacher cache {meta_path} cannot be read ({damage}); the store is rebuilt")
                warned = True
            _publish_meta(meta_path, {**description, "generation": uuid.uuid4().hex}, replace=True)
        raise CacheUnavailable(f"teacher cache {meta_path} keeps changing or cannot be read; delete the folder "
                               f"{self.dir} or set distill.teacher_cache.dir elsewhere")

    def _keyed(self) -> None:
        """The tag hasher of this store and generation (copied for each record)."""
        secret = hashlib.sha256(f"{self.key}/{self.generation}".encode()).digest()
        self._hasher = hashlib.blake2b(key=secret, digest_size=TAG_BYTES)

    def _open(self, name: str, entries: int) -> _Column:
        """The store file `name` (sparse: no disk space is used until records are written), open for pread/pwrite.
        A file shorter than this store needs is grown; nothing is ever truncated or replaced under another process
        (a record beyond a file's end reads as empty)."""
        path = self.dir / name
        size = entries * self.record_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            return _Column(fd=fd, dtype=np.uint8, shape=(entries, self.record_bytes))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close the store's files (the process keeps no descriptor of a store it no longer uses)."""
        column = getattr(self, "records", None)
        if isinstance(column, _Column):
            column.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _stop_storing(self, e: OSError) -> None:
        """Turn storing off for the rest of the run, with one warning that says why."""
        if not self.writable:
            return
        self.writable = False
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        warnings.warn(f"teacher cache {self.dir}: {reason}; the teacher is computed from now on without storing")

    # ------------------------------------------------------------------ records
    def _tags(self, positions: list[int], payload: np.ndarray) -> np.ndarray:
        """The keyed tag of each record: BLAKE2b over its (index, view) and its rows."""
        tags = np.empty((len(positions), TAG_BYTES), np.uint8)
        for k, pos in enumerate(positions):
            h = self._hasher.copy()
            h.update(struct.pack("<qq", pos // self.num_views, pos % self.num_views))
            h.update(payload[k])
            tags[k] = np.frombuffer(h.digest(), np.uint8)
        return tags

    def _read(self, positions: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(which records pass their tag, each output's stored rows) of `positions`: one read of each run of
        consecutive records; the rows returned are the very bytes that were checked."""
        records = np.ascontiguousarray(self.records[np.asarray(positions, np.int64)]).reshape(len(positions), -1)
        payload = np.ascontiguousarray(records[:, TAG_BYTES:])
        ok = (records[:, :TAG_BYTES] == self._tags(positions, payload)).all(axis=1)
        rows, offset = {}, 0
        for name, width in self.row_bytes.items():
            rows[name] = np.ascontiguousarray(payload[:, offset:offset + width]).view(self.dtypes[name])
            offset += width
        return ok, rows

    def _store(self, positions: list[int], packed: Mapping[str, np.ndarray]) -> list[int]:
        """Write each entry as one whole record (tag and rows, one pwrite), releasing its claim (if any) as soon as
        it is written; stop storing on a full disk. The positions written."""
        if not self.writable or not positions:
            return []
        payload = np.concatenate([np.ascontiguousarray(packed[n], self.dtypes[n]).reshape(len(positions), -1)
                                  .view(np.uint8) for n in self.cols], axis=1)
        records = np.concatenate([self._tags(positions, payload), payload], axis=1)
        written = []
        try:
            for k, pos in enumerate(positions):
                self.records.put(pos, records[k])
                written.append(pos)
                if self.claims is not None:
                    self._release([pos])
        except OSError as e:  # a full disk: keep training, stop storing
            self._stop_storing(e)
        return written

    # ------------------------------------------------------------------ claims (disk stores only)
    def _claim_path(self, pos: int) -> Path:
        return self.claims / str(pos)

    @staticmethod
    def _stamp(pid: int | None = None, node: str | None = None, at: float | None = None) -> bytes:
        """A claim's content: node, process id and time."""
        return f"{node or NODE} {os.getpid() if pid is None else pid} {time.time() if at is None else at:.3f}\n".encode()

    def _claim_is_stale(self, path: Path) -> bool:
        """Whether the claim at `path` will never be followed by its record: gone, older than CLAIM_TIMEOUT_S,
        by this process, or by a process of this node that no longer runs."""
        try:
            text = path.read_text()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return True
        except (OSError, UnicodeDecodeError):
            return False
        try:
            node, pid_text, at_text = text.split()
            pid, at = int(pid_text), float(at_text)
        except ValueError:  # written by a process killed between creating it and filling it
            return time.time() - mtime > 5.0
        if abs(time.time() - at) > CLAIM_TIMEOUT_S:
            return True
        if node != NODE:  # another machine: only its age says anything
            return False
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        try:  # killed but not yet reaped by its parent (a zombie): gone all the same
            stat = Path(f"/proc/{pid}/stat").read_text()
            return stat[stat.rindex(")") + 2:].startswith(("Z", "X"))
        except (OSError, ValueError):
            return False

    def _claim(self, pos: int) -> bool:
        """Create the claim of `pos` exclusively (True), taking over a stale one; False while another holds it."""
        path = self._claim_path(pos)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._claim_is_stale(path):
                    return False
                # only one of the processes that found it stale wins its rename; the others try again
                aside = path.with_name(f".{path.name}.{NODE}.{os.getpid()}.stale")
                try:
                    os.rename(path, aside)
                    os.unlink(aside)
                except FileNotFoundError:
                    pass
                continue
            try:
                os.write(fd, self._stamp())
            finally:
                os.close(fd)
            return True
        return False

    def _release(self, positions: Iterable[int]) -> None:
        for pos in positions:
            try:
                os.unlink(self._claim_path(pos))
            except OSError:
                pass

    def _triage(self, positions: list[int]) -> tuple[list[int], dict[str, np.ndarray], list[int], list[int],
                                                     list[int]]:
        """Split distinct positions into (valid, their rows, to compute, claimed by another live process, claims
        taken here); the claims taken are a subset of those to compute (all of them while storing works)."""
        if not positions:
            return [], {n: np.zeros((0, c), self.dtypes[n]) for n, c in self.cols.items()}, [], [], []
        ok, rows = self._read(positions)
        valid = [p for p, good in zip(positions, ok) if good]
        missing = [p for p, good in zip(positions, ok) if not good]
        rows = {n: r[ok] for n, r in rows.items()}
        if self.claims is None or not self.writable:
            return valid, rows, missing, [], []
        mine, wait = [], []
        try:
            for pos in missing:
                (mine if self._claim(pos) else wait).append(pos)
        except OSError as e:  # cannot even create a claim (a full disk, a read-only mount): compute, do not store
            self._release(mine)
            self._stop_storing(e)
            return valid, rows, missing, [], []
        if mine:  # a record finished between the read above and the claim: serve it, do not compute it again
            again_ok, again_rows = self._read(mine)
            if again_ok.any():
                done = [p for p, good in zip(mine, again_ok) if good]
                self._release(done)
                valid += done
                rows = {n: np.concatenate([rows[n], again_rows[n][again_ok]]) for n in rows}
                mine = [p for p, good in zip(mine, again_ok) if not good]
        return valid, rows, list(mine), wait, mine

    def _pack(self, name: str, values: torch.Tensor) -> np.ndarray:
        rows = values.detach().float().cpu().numpy()
        if name in self.topk:
            return np.stack([_compress(r, self.topk[name]) for r in rows]).astype(np.float32)
        return encode_rows(rows)

    def _unpack(self, name: str, rows: np.ndarray) -> torch.Tensor:
        if name in self.topk:
            rows = np.stack([_expand(r, self.topk[name], self.outputs[name]) for r in rows.astype(np.float32)])
            return torch.from_numpy(rows)
        return torch.from_numpy(decode_rows(rows))

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, views: torch.Tensor,
                 compute: Callable[[torch.Tensor], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The teacher's outputs for the batch: stored rows where valid, `compute` on the rest (then stored).

        The entries this job claimed are computed, stored and released before it waits for entries that other
        jobs claimed: a job never waits while holding claims, so two jobs whose batches cross never wait on each
        other."""
        idx, vw = indices.tolist(), views.tolist()
        in_range = [0 <= v < self.num_views and 0 <= i < self.num_samples for i, v in zip(idx, vw)]
        positions = [i * self.num_views + v for i, v in zip(idx, vw)]
        first_row: dict[int, int] = {}
        for j, (p, ok) in enumerate(zip(positions, in_range)):
            if ok:
                first_row.setdefault(p, j)
        valid, rows, todo, wait, mine = self._triage(list(first_row))
        hit_blocks, hit = [rows], {p: (0, k) for k, p in enumerate(valid)}
        chunks: list[dict[str, np.ndarray]] = []
        fresh: dict[int, tuple[int, int]] = {}  # entry (or -(row + 1) for a row beyond the store) -> (chunk, row)

        def compute_now(keys: list[int], claimed: list[int]) -> None:
            """Compute the rows of `keys`, store those of `claimed` (the claims taken) and release the claims."""
            written: list[int] = []
            try:
                rows_at = [first_row[k] if k >= 0 else -k - 1 for k in keys]
                result = {n: v for n, v in compute(x[rows_at]).items() if n in self.outputs}
                # served in the stored form: what a later hit serves
                packed = {n: self._pack(n, result[n]) for n in self.outputs}
                chunks.append(packed)
                at = {key: k for k, key in enumerate(keys)}
                fresh.update((key, (len(chunks) - 1, k)) for key, k in at.items())
                if claimed:
                    written = self._store(claimed, {n: packed[n][[at[p] for p in claimed]] for n in self.cols})
            finally:
                if self.claims is not None:
                    self._release(set(claimed) - set(written))

        outside = [-(j + 1) for j, ok in enumerate(in_range) if not ok]
        if outside or todo:
            compute_now(outside + todo, mine if self.claims is not None else todo)
        deadline = time.time() + CLAIM_TIMEOUT_S
        while wait and time.time() < deadline:  # another job is computing these: wait for their records
            time.sleep(0.02)
            again_valid, again_rows, again_todo, wait, again_mine = self._triage(wait)
            hit.update((p, (len(hit_blocks), k)) for k, p in enumerate(again_valid))
            hit_blocks.append(again_rows)
            if again_todo:  # their claims were given up: ours now
                compute_now(again_todo, again_mine)
        if wait:  # waited long enough: computed here (not stored: the claims are another's)
            compute_now(wait, [])
        hit_j, hit_src, miss_j, miss_src = [], [], [], []
        hit_offset = np.cumsum([0] + [len(next(iter(b.values()))) if b else 0 for b in hit_blocks])
        fresh_offset = np.cumsum([0] + [len(next(iter(c.values()))) if c else 0 for c in chunks])
        for j, (p, ok) in enumerate(zip(positions, in_range)):
            if ok and p in hit:
                block, k = hit[p]
                hit_j.append(j)
                hit_src.append(int(hit_offset[block]) + k)
            else:
                chunk, k = fresh[p if ok else -(j + 1)]
                miss_j.append(j)
                miss_src.append(int(fresh_offset[chunk]) + k)
        self.misses += len(miss_j)
        self.hits += len(hit_j)
        self.run_misses += len(miss_j)
        self.run_hits += len(hit_j)
        out: dict[str, torch.Tensor] = {}
        for name in self.outputs:
            full = torch.empty(len(positions), self.outputs[name], dtype=torch.float32)
            if hit_j:
                stored = np.concatenate([b[name] for b in hit_blocks])
                full[hit_j] = self._unpack(name, stored[hit_src])
            if miss_j:
                made = np.concatenate([c[name] for c in chunks])
                full[miss_j] = self._unpack(name, made[miss_src])
            out[name] = full.to(x.device)
        return out

    def stats(self) -> dict[str, float]:
        """Hits, misses and hit rate since the last reset."""
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0}

    def run_summary(self, hits: int | None = None, misses: int | None = None) -> dict[str, Any]:
        """What the run's record says of the cache: its mode and folder, and the hits and misses of the whole run
        (this process's, or the totals over the ranks when given)."""
        hits, misses = (self.run_hits if hits is None else int(hits)), (self.run_misses if misses is None else int(misses))
        total = hits + misses
        return {"mode": self.mode, "dir": str(self.dir) if self.dir is not None else None, "hits": hits,
                "misses": misses, "hit_rate": round(hits / total, 4) if total else 0.0}
