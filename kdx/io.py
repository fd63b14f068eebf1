"""Files kdx writes: atomic JSON, results.json of a run, and a hash of the config that produced it."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
# name parts of folders kdx set aside instead of overwriting (force=true reruns, interrupted stages)
SET_ASIDE_MARKERS = (".replaced-", ".incomplete-")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's results.json as a dict, or None when absent or unreadable."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(run_dir: str | Path) -> bool:
    """True when the folder holds a results.json whose status is `completed`."""
    results = read_results(run_dir)
    return bool(results) and results.get("status") == "completed"


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a (resolved) config, to tell whether two runs were asked the same thing."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
