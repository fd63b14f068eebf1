"""The teacher cache: a frozen teacher's outputs per (sample, view), computed once and shared by every job.

Neither the temperature nor alpha changes what the teacher says about an image, so a sweep over them needs
the teacher's outputs once per augmented view, not once per job and epoch. With seeded views
(kdx.data.views) a view is a function of (seed, view, index) alone, so an entry is addressed by
(index, view) and is valid in any run whose teacher, data, transforms and seed are the same: the store's
key hashes all of them, and a change to any of them opens another store.

Stores hold float16 rows (or, with `topk`, the k largest log-probabilities and their classes, the rest of
the probability mass spread evenly). `memory` keeps them in the process; `disk` in memory-mapped files
under `dir`, shared by parallel jobs: a file lock guards the per-entry state (empty, claimed, valid), a job
computes only entries nobody else has claimed, and every entry carries a CRC32 checked on each read, so a
torn or damaged entry is recomputed, never served.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from kdx.errors import ConfigError, KdxError

MODES = ("off", "memory", "disk")
EMPTY, VALID, CLAIMED = 0, 1, 2
CLAIM_TIMEOUT_S = 120.0  # a claim older than this, or by a process that is gone, is taken over


class CacheUnavailable(KdxError):
    """The store cannot be used (unwritable folder, another teacher's store); the teacher is computed instead."""


def check_cache_config(cfg: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The `distill.teacher_cache` section with defaults filled in; bad values are a ConfigError naming the key."""
    if cfg is None or isinstance(cfg, (str, bool)):
        cfg = {"mode": "off" if cfg in (None, False) else ("memory" if cfg is True else cfg)}
    cfg = {"mode": "off", "dir": None, "views": None, "topk": None, **dict(cfg)}
    unknown = sorted(set(cfg) - {"mode", "dir", "views", "topk"})
    if unknown:
        raise ConfigError(f"distill.teacher_cache.{unknown[0]} is not a setting; use mode, dir, views or topk")
    mode = str(cfg["mode"]).lower() if cfg["mode"] not in (False, None) else "off"
    if mode not in MODES:
        raise ConfigError(f"distill.teacher_cache.mode must be off, memory or disk, got {cfg['mode']!r}")
    for key in ("views", "topk"):
        value = cfg[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"distill.teacher_cache.{key} must be null or an integer >= 1, got {value!r}")
    return {**cfg, "mode": mode}


def default_cache_dir() -> Path:
    """$KDX_CACHE_DIR, else ~/.cache/kdx/teacher (shared by every run and sweep job of this user)."""
    return Path(os.environ.get("KDX_CACHE_DIR") or Path.home() / ".cache" / "kdx" / "teacher")


def teacher_fingerprint(teacher: nn.Module | None, extra_file: str | os.PathLike | None = None) -> str:
    """SHA-256 of a network's state (names, shapes, dtypes, values) or of a model file (ONNX teachers)."""
    h = hashlib.sha256()
    if extra_file is not None:
        with open(extra_file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    if teacher is not None:
        for name, value in sorted(teacher.state_dict().items()):
            h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(teacher_hash: str, data: Mapping[str, Any], seed: int, views: int | None, topk: int | None,
              outputs: Mapping[str, int]) -> str:
    """The store's name: a hash of teacher, data source and transforms, seed, view scheme and stored outputs."""
    blob = json.dumps({"teacher": teacher_hash, "data": data, "seed": int(seed), "views": views, "topk": topk,
                       "outputs": dict(outputs), "format": 1}, sort_keys=True, default=str)
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


def _crc_of(rows: Iterable[np.ndarray]) -> int:
    """CRC32 of one entry: its rows (one per stored output, in column order) back to back."""
    c = 0
    for row in rows:
        c = zlib.crc32(np.ascontiguousarray(row).tobytes(), c)
    return c & 0xFFFFFFFF


class TeacherCache:
    """Teacher outputs by (sample index, view); `cache(x, indices, views, compute)` serves hits, computes misses."""

    def __init__(self, key: str, num_samples: int, num_views: int, outputs: Mapping[str, int], mode: str = "memory",
                 root: str | os.PathLike | None = None, topk: int | None = None, meta: Mapping[str, Any] | None = None):
        self.key, self.num_samples, self.num_views = key, int(num_samples), int(num_views)
        self.outputs = dict(outputs)  # name -> width of its row
        self.topk = {n: min(int(topk), w) for n, w in self.outputs.items() if topk and n == "logits" and w > topk}
        self.cols = {n: (2 * self.topk[n] + 1 if n in self.topk else w) for n, w in self.outputs.items()}
        self.mode = mode
        self.hits = self.misses = 0
        self.writable = True
        n = self.num_samples * self.num_views
        if mode == "memory":
            self.dir = None
            self.state = np.zeros(n, np.uint8)
            self.crc = np.zeros(n, np.uint32)
            self.owner = np.zeros(n, np.int64)
            self.data = {name: np.zeros((n, c), np.float16) for name, c in self.cols.items()}
            return
        self.dir = Path(root or default_cache_dir()) / key
        description = {"key": key, "num_samples": self.num_samples, "num_views": self.num_views,
                       "outputs": self.outputs, "topk": topk, **dict(meta or {})}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self._locked():
                meta_path = self.dir / "meta.json"
                if meta_path.is_file():
                    found = json.loads(meta_path.read_text())
                    if any(found.get(k) != description[k] for k in ("key", "num_samples", "num_views", "outputs")):
                        raise CacheUnavailable(f"teacher cache {self.dir} was built for another teacher or data "
                                               f"({found.get('num_samples')} samples x {found.get('num_views')} "
                                               "views); delete it or set distill.teacher_cache.dir elsewhere")
                else:
                    tmp = meta_path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(description, indent=1, sort_keys=True, default=str))
                    tmp.replace(meta_path)
                self.state = self._memmap("state", np.uint8, (n,))
                self.crc = self._memmap("crc", np.uint32, (n,))
                self.owner = self._memmap("owner", np.int64, (n,))
                self.data = {name: self._memmap(f"out-{name}", np.float16, (n, c)) for name, c in self.cols.items()}
        except OSError as e:
            raise CacheUnavailable(f"teacher cache folder {self.dir} cannot be written ({e.strerror or e}); set "
                                   "distill.teacher_cache.dir to a writable folder or distill.teacher_cache.mode=memory"
                                   ) from None

    # ------------------------------------------------------------------ files
    def _memmap(self, name: str, dtype, shape: tuple[int, ...]) -> np.memmap:
        path = self.dir / f"{name}.bin"
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:  # sparse: no disk space is used until entries are written
                f.truncate(size)
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.dir is None:
            yield
            return
        with open(self.dir / "lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ entries
    def _checksum(self, pos: int) -> int:
        return _crc_of(self.data[name][pos] for name in self.cols)

    def _claim_is_stale(self, pos: int) -> bool:
        owner = int(self.owner[pos])
        pid, started = owner >> 32, owner & 0xFFFFFFFF
        if pid == os.getpid():
            return True
        if time.time() % 2 ** 32 - started > CLAIM_TIMEOUT_S:
            return True
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False

    def _triage(self, positions: list[int]) -> tuple[list[int], list[int], list[int]]:
        """Split positions into (valid, to compute now, claimed by another live process); claim the second.

        States, checksums and rows are read with one gather per array (a per-entry memmap read costs ~10x more).
        """
        unique = list(dict.fromkeys(positions))
        valid, todo, wait = [], [], []
        if not unique:
            return valid, todo, wait
        at = np.asarray(unique, dtype=np.int64)
        stamp = (os.getpid() << 32) | int(time.time() % 2 ** 32)
        with self._locked():
            states, stored_crc = np.asarray(self.state[at]), np.asarray(self.crc[at])
            rows = [np.asarray(self.data[name][at]) for name in self.cols]
            for k, pos in enumerate(unique):
                state = int(states[k])
                if state == VALID and int(stored_crc[k]) == _crc_of(row[k] for row in rows):
                    valid.append(pos)
                elif state == CLAIMED and not self._claim_is_stale(pos):
                    wait.append(pos)
                else:  # empty, damaged (checksum) or abandoned: ours to compute
                    if self.writable:
                        self.state[pos], self.owner[pos] = CLAIMED, stamp
                    todo.append(pos)
        return valid, todo, wait

    def _write(self, positions: list[int], rows: dict[str, np.ndarray]) -> None:
        if not self.writable:
            return
        try:
            for i, pos in enumerate(positions):
                for name in self.cols:
                    self.data[name][pos] = rows[name][i]
                self.crc[pos] = self._checksum(pos)
            if self.dir is not None:
                for arr in (*self.data.values(), self.crc):
                    arr.flush()
            with self._locked():
                for pos in positions:
                    self.state[pos], self.owner[pos] = VALID, 0
                if self.dir is not None:
                    self.state.flush()
        except OSError as e:  # a full disk: keep training, stop storing
            self.writable = False
            reason = "the disk is full" if e.errno == errno.ENOSPC else str(e)
            warnings.warn(f"teacher cache {self.dir}: {reason}; the teacher is computed from now on without storing")
            with self._locked():
                for pos in positions:
                    self.state[pos] = EMPTY

    def _pack(self, name: str, values: torch.Tensor) -> np.ndarray:
        rows = values.detach().float().cpu().numpy()
        if name in self.topk:
            rows = np.stack([_compress(r, self.topk[name]) for r in rows])
        return rows

    def _unpack(self, name: str, rows: np.ndarray) -> torch.Tensor:
        rows = rows.astype(np.float32)
        if name in self.topk:
            rows = np.stack([_expand(r, self.topk[name], self.outputs[name]) for r in rows])
        return torch.from_numpy(rows)

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, views: torch.Tensor,
                 compute: Callable[[torch.Tensor], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The teacher's outputs for the batch: stored rows where valid, `compute` on the rest (then stored)."""
        idx, vw = indices.tolist(), views.tolist()
        in_range = [0 <= v < self.num_views and 0 <= i < self.num_samples for i, v in zip(idx, vw)]
        positions = [i * self.num_views + v for i, v in zip(idx, vw)]
        valid, todo, wait = self._triage([p for p, ok in zip(positions, in_range) if ok])
        deadline = time.time() + CLAIM_TIMEOUT_S
        while wait and time.time() < deadline:  # another job is computing these: wait for them
            time.sleep(0.02)
            again_valid, again_todo, wait = self._triage(wait)
            valid += again_valid
            todo += again_todo
        todo += wait
        have = set(valid)
        rows_needed = [j for j, (p, ok) in enumerate(zip(positions, in_range)) if not ok or p not in have]
        out: dict[str, torch.Tensor] = {}
        computed: dict[str, torch.Tensor] = {}
        if rows_needed:
            computed = {n: v for n, v in compute(x[rows_needed]).items() if n in self.outputs}
            row_of = {positions[j]: k for k, j in enumerate(rows_needed)}
            store = [p for p in dict.fromkeys(todo) if p in row_of]
            if store:
                packed = {n: self._pack(n, computed[n][[row_of[p] for p in store]]) for n in self.cols}
                self._write(store, packed)
        self.misses += len(rows_needed)
        self.hits += len(positions) - len(rows_needed)
        needed = set(rows_needed)
        hit_rows = [j for j in range(len(positions)) if j not in needed]
        for name in self.outputs:
            device = x.device
            full = torch.empty(len(positions), self.outputs[name], dtype=torch.float32)
            if hit_rows:
                stored = self.data[name][[positions[j] for j in hit_rows]]
                full[hit_rows] = self._unpack(name, np.asarray(stored))
            if rows_needed:
                fresh = computed[name].detach().float().cpu()
                if name in self.topk:  # serve what a later hit would serve: the same compressed form
                    fresh = self._unpack(name, self._pack(name, fresh))
                else:
                    fresh = fresh.half().float()
                full[rows_needed] = fresh
            out[name] = full.to(device)
        return out

    def stats(self) -> dict[str, float]:
        """Hits, misses and hit rate since the last reset."""
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0}
