"""Find every kdx job under a run or multirun folder and load it into a `JobRecord`."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdx.errors import KdxError
from kdx.io import SET_ASIDE_MARKERS  # folders kdx set aside: kept on disk, not reported

RESULTS_NAME = "results.json"
HYDRA_DIR = ".hydra"
COMPLETED = "completed"
FAILED = "failed"
RUNNING = "running"

# hparams the report shows in their own columns; looked up in `hparams`, then in the overrides
HPARAM_KEYS = ("pair", "teacher", "student", "method", "temperature", "alpha")


@dataclass
class JobRecord:
    """One job: a results.json (or a Hydra job folder that died before writing one)."""

    rel: str  # job folder relative to the report root, "." for the root itself
    job_dir: Path
    status: str  # completed | failed | running | other status string found in the file
    reason: str | None = None  # why the job counts as failed; None for a completed job
    results_path: Path | None = None
    task: str | None = None
    experiment: str | None = None
    overrides: list[str] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    monitor: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    time: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the job finished and its metrics can be ranked."""
        return self.status == COMPLETED

    @property
    def overrides_str(self) -> str:
        """The job's Hydra overrides joined by spaces."""
        return " ".join(self.overrides)

    def hparam(self, key: str) -> Any:
        """An hparam from results.json, else from an override whose last dotted key is `key`."""
        value = self.hparams.get(key)
        if value is not None and value != "":
            return value
        for item in reversed(self.overrides):  # later overrides win, as in Hydra
            name, sep, val = item.partition("=")
            if sep and name.lstrip("+~").split(".")[-1] == key:
                return val
        return None

    def number(self, key: str) -> float | None:
        """`hparam(key)` as a float, or None when missing or not a number."""
        return to_float(self.hparam(key))

    @property
    def pair_label(self) -> str:
        """Group label for per-pair plots: the pair, else teacher->student, else ''."""
        pair = self.hparam("pair")
        if pair in (None, ""):
            teacher, student = self.hparam("teacher"), self.hparam("student")
            pair = f"{teacher}->{student}" if teacher and student else ""
        pair = str(pair)
        if pair and str(self.hparams.get("network", "")) == "teacher":
            pair += " (teacher)"  # a pipeline's teacher stage must not pass for the distilled student
        return pair


def to_float(value: Any) -> float | None:
    """A finite-or-NaN float from a number or numeric string; None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def natural_key(text: str) -> list[Any]:
    """Sort key that orders '2' before '10' (Hydra job numbers)."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


def find_results_files(root: Path) -> list[Path]:
    """Every results.json under `root`, recursively, skipping hidden folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not any(m in d for m in SET_ASIDE_MARKERS))
        if RESULTS_NAME in filenames:
            found.append(Path(dirpath) / RESULTS_NAME)
    return found


def find_dead_jobs(root: Path, results_files: list[Path]) -> list[Path]:
    """Hydra job folders (with .hydra/) that have no results.json in them or below them."""
    covered: set[Path] = set()  # every folder that holds a results.json at or below it
    for path in results_files:
        covered.add(path.parent)
        covered.update(path.parent.parents)
    dead = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not any(m in d for m in SET_ASIDE_MARKERS))
        folder = Path(dirpath)
        if folder not in covered and (folder / HYDRA_DIR).is_dir():
            dead.append(folder)
    return dead


def _rel(folder: Path, root: Path) -> str:
    """`folder` relative to `root` with forward slashes, '.' for the root."""
    rel = folder.relative_to(root).as_posix()
    return rel or "."


def read_hydra_overrides(job_dir: Path, root: Path) -> list[str]:
    """Overrides from the nearest .hydra/overrides.yaml at or above `job_dir` (up to `root`)."""
    for folder in (job_dir, *job_dir.parents):
        path = folder / HYDRA_DIR / "overrides.yaml"
        if path.is_file():
            try:
                import yaml

                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except Exception:  # a broken overrides.yaml only costs the overrides column
                return []
            return [str(x) for x in data] if isinstance(data, list) else []
        if folder == root:
            break
    return []


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a dict, else an empty dict."""
    return value if isinstance(value, dict) else {}


def _metrics(value: Any) -> dict[str, float]:
    """The numeric entries of a metrics dict (non-numbers are dropped)."""
    out = {}
    for key, val in _dict(value).items():
        num = to_float(val)
        if num is not None:
            out[str(key)] = num
    return out


def load_job(path: Path, root: Path) -> JobRecord:
    """Load one results.json; a file that cannot be read or parsed gives a failed record."""
    job_dir = path.parent
    rel = _rel(job_dir, root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return JobRecord(
            rel=rel, job_dir=job_dir, status=FAILED, results_path=path,
            reason=f"{RESULTS_NAME} cannot be parsed ({msg})",
            overrides=read_hydra_overrides(job_dir, root),
        )
    if not isinstance(data, dict):
        return JobRecord(
            rel=rel, job_dir=job_dir, status=FAILED, results_path=path,
            reason=f"{RESULTS_NAME} holds a {type(data).__name__}, not a JSON object",
            overrides=read_hydra_overrides(job_dir, root),
        )

    overrides = data.get("overrides")
    if isinstance(overrides, list):
        overrides = [str(x) for x in overrides]
    else:
        overrides = read_hydra_overrides(job_dir, root)
    metrics = _metrics(data.get("metrics"))
    status = data.get("status")
    error = data.get("error")
    reason = None
    if status is None:
        status = COMPLETED if metrics else FAILED
        if not metrics:
            reason = f"{RESULTS_NAME} has no status and no metrics"
    else:
        status = str(status)
    if status == FAILED and reason is None:
        reason = str(error) if error else "status is 'failed' with no error message"
    elif status == RUNNING:
        reason = "status is still 'running': the job died (or is still running) before finishing"
    elif status not in (COMPLETED, FAILED):
        reason = f"unknown status {status!r}"

    return JobRecord(
        rel=rel, job_dir=job_dir, status=status, reason=reason, results_path=path,
        task=data.get("task") if isinstance(data.get("task"), str) else None,
        experiment=data.get("experiment") if isinstance(data.get("experiment"), str) else None,
        overrides=overrides,
        hparams=_dict(data.get("hparams")),
        metrics=metrics,
        monitor=_dict(data.get("monitor")),
        params=_dict(data.get("params")),
        time=_dict(data.get("time")),
        raw=data,
    )


def collect_jobs(root: str | os.PathLike[str]) -> list[JobRecord]:
    """Every job under `root`: one record per results.json plus one per Hydra job that died without one."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise KdxError(f"{root} {what}; point kdx-report at a run or multirun folder.")
    root = root.resolve()
    files = find_results_files(root)
    if not files:
        dead = find_dead_jobs(root, files)
        extra = f" ({len(dead)} Hydra job folders died before writing one)" if dead else ""
        raise KdxError(
            f"no {RESULTS_NAME} under {root}{extra}; point kdx-report at a run or multirun folder."
        )
    jobs = [load_job(p, root) for p in files]
    for folder in find_dead_jobs(root, files):
        jobs.append(JobRecord(
            rel=_rel(folder, root), job_dir=folder, status=FAILED,
            reason=f"no {RESULTS_NAME}: the job died before writing it",
            overrides=read_hydra_overrides(folder, root),
        ))
    jobs.sort(key=lambda j: natural_key(j.rel))
    return jobs


def is_nan(value: float | None) -> bool:
    """True for None or NaN."""
    return value is None or math.isnan(value)
