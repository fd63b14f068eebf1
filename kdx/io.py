"""Files kdx reads and writes: atomic writes, loading torch files without running code, claiming a run folder,
cleaning the temporaries a killed process left, results.json of a run, and a hash of the config behind it."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdx.errors import CheckpointError, DiskFullError, RunBusyError

RESULTS_FILE = "results.json"
LOCK_FILE = ".kdx-lock"  # held (flock) by the process that owns a run folder; the kernel releases it on any exit
# name parts of folders kdx set aside instead of overwriting (force=true reruns, interrupted stages)
SET_ASIDE_MARKERS = (".replaced-", ".incomplete-")

# A temporary is `.<name>.tmp-<pid>-<random>` next to its target, so a later start can tell a dead writer's
# leftovers (removed) from a live writer's file (kept). Older kdx versions wrote `.<name>.tmp-<pid>` and
# `.<name>.<random>.tmp`.
_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<pid>\d+)(-[0-9a-f]+)?$")
_OLD_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_cause(error: BaseException | None) -> OSError | None:
    """The error in `error`'s chain (itself, its cause or context) that says a disk is full (ENOSPC) or a quota
    used up (EDQUOT): a DiskFullError, else such an OSError; None when there is none."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:
        if isinstance(e, DiskFullError):
            return e
    return next((e for e in chain if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS), None)


def disk_full_error(error: OSError, path: str | Path | None = None) -> DiskFullError:
    """A DiskFullError for the disk-full OSError `error`, met writing `path` (default: the file it names)."""
    target = path if path is not None else (error.filename2 or error.filename)
    full = DiskFullError(f"{disk_full_sentence(error, target)}; free space there or write to another disk")
    full.target, full.quota = (os.fsdecode(target) if target is not None else None), error.errno == errno.EDQUOT
    return full


def disk_full_sentence(error: OSError, path: str | Path | None = None) -> str:
    """`no space left on the disk holding FOLDER (writing NAME)`: the folder of the write that failed (the
    target of a copy or rename where there is one), or of `path`."""
    if isinstance(error, DiskFullError):
        target, quota = (path if path is not None else error.target), error.quota
    else:
        target, quota = (path if path is not None else (error.filename2 or error.filename)), error.errno == errno.EDQUOT
    where = Path(os.fsdecode(target)) if target is not None else None
    what = "no quota left" if quota else "no space left"
    if where is None:
        return f"{what} on the disk holding the run folder"
    folder, name = where.parent, where.name
    if name.startswith(".") and ".tmp-" in name:  # kdx's temporary: name the file it stands for
        name = name[1:].split(".tmp-", 1)[0]
    return f"{what} on the disk holding {folder} (writing {name})"


def temporary_path(path: str | Path) -> Path:
    """A fresh temporary name next to `path` that names this process (see clean_stale_temporaries)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; on success it is flushed and renamed over `path`.

    Whatever happens before the rename (an exception, a kill), `path` keeps its previous complete content.
    A full disk (or quota) is a DiskFullError naming the folder, with the temporary removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if disk_full_cause(e) is None:
            raise
        raise disk_full_error(e, path) from e
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full_cause(e)
        if full is None or isinstance(e, DiskFullError):
            raise
        raise disk_full_error(full, path) from e
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so a crash never leaves half a file."""
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(folder: str | Path, recursive_into: tuple[str, ...] = ("checkpoints",)) -> list[Path]:
    """Remove temporaries that killed kdx processes left in `folder` (and its `recursive_into` subfolders).

    A temporary whose writer is still running is kept. Returns the removed paths.
    """
    removed = []
    folder = Path(folder)
    for where in (folder, *(folder / sub for sub in recursive_into)):
        if not where.is_dir():
            continue
        for entry in where.iterdir():
            m = _TEMPORARY.match(entry.name)
            stale = (m is not None and not _pid_alive(int(m.group("pid")))) or _OLD_TEMPORARY.match(entry.name)
            if stale and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


# --------------------------------------------------------------------------- claiming a run folder
_HELD_LOCKS: dict[str, int] = {}


def claim_folder(folder: str | Path) -> None:
    """Take `folder` for this process (an exclusive flock on `<folder>/.kdx-lock`, kept until exit or release).

    Raises RunBusyError naming the other process when a live one holds it. A killed owner's claim is gone
    with it (the kernel drops the lock), so a resumed run can always take its folder back.
    """
    folder = Path(folder).resolve()
    key = str(folder)
    if key in _HELD_LOCKS:
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no claim
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise RunBusyError(f"run folder {folder} is in use by another kdx process (pid {owner}); wait for it to "
                           f"finish, or choose another folder (hydra.run.dir=...)") from None
    except OSError:  # a filesystem without locks (some network mounts): run unclaimed, as before
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[key] = fd


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), close the inherited lock descriptors: the claim stays the
    parent's alone, and is gone as soon as the parent dies, whatever its workers do."""
    for fd in _HELD_LOCKS.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def release_folder(folder: str | Path) -> None:
    """Give up this process's claim on `folder` (no-op when it holds none)."""
    fd = _HELD_LOCKS.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def create_unique_folder(base: str | Path, name: str) -> Path:
    """Create and return `base/name`, or `base/name-2`, `-3`, ... when another process created it first.

    os.mkdir either creates the folder or fails, so two processes asking at the same instant get two folders.
    """
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = base / (name if n == 1 else f"{name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


# --------------------------------------------------------------------------- torch files, without code
def _refused_global(message: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load(path, weights_only=True) onto the CPU: tensors and plain Python values only, never code.

    A file that holds other Python objects (a pickled model, or a crafted payload) is refused with a
    CheckpointError naming the file and the object; so is a missing, truncated or non-torch file.
    """
    import pickle

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; pass the path of an existing file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = _refused_global(str(e))
        found = f"the Python object {name}" if name else "Python objects other than tensors and plain values"
        raise CheckpointError(f"{what} {path} holds {found}, which kdx never loads because unpickling it could run "
                              f"code; save tensors only (torch.save(model.state_dict(), path)), use a kdx checkpoint, "
                              f"or export the model to ONNX") from None
    except Exception as e:  # truncated file, not a torch file, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{what} {path} cannot be read ({type(e).__name__}: {first}); it may be truncated or "
                              f"not a torch file") from None


# --------------------------------------------------------------------------- results.json
def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's results.json as a dict, or None when absent or unreadable."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a (resolved) config, to tell whether two runs were asked the same thing."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sidecar_path(out_path: str | Path) -> Path:
    """`<out>.json`: the description kdx-export writes next to an exported file (read by kdx-eval)."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".json")
