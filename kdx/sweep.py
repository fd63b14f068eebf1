"""Sweeps and re-runs: where a run or sweep writes (`resume=`), what a re-run does with a folder that already
holds a run (skip, resume, set aside), the end-of-sweep summary, and DDP jobs isolated in their own process.

`run_ddp_worker` starts the DDP worker (`python -m kdx.ddp_worker RUN_DIR`): it trains the config saved in
RUN_DIR/config.yaml in a fresh process tree, so that Lightning's `ddp` launcher re-runs that worker (not the
Hydra multirun) for ranks > 0.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdx.errors import ConfigError
from kdx.io import LOCK_FILE, RESULTS_FILE, SET_ASIDE_MARKERS, read_results

RESUME_CKPT_ENV = "KDX_RESUME_CKPT"  # checkpoint that rank 0 resumes from, inherited by the other ranks
LAST_CKPT = Path("checkpoints") / "last.ckpt"


# ---------------------------------------------------------------- run and sweep folders (`resume=`)

def latest_run(base: str | Path) -> Path | None:
    """The newest run folder directly under `base` (timestamped names sort by time), or None."""
    base = Path(base)
    if not base.is_dir():
        return None
    runs = sorted(p for p in base.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not any(m in p.name for m in SET_ASIDE_MARKERS))
    return runs[-1] if runs else None


def resolve_run_dir(resume: Any, base: str, stamp: str) -> str:
    """Hydra's run (or sweep) folder: `base/stamp` for a new run, the newest folder under `base` for
    `resume=true`, or the folder given as `resume=PATH`.

    A new run's folder is created here, atomically (kdx.io.create_unique_folder): two runs started in the
    same second get `base/stamp` and `base/stamp-2` instead of sharing one folder. (The resolver is cached,
    and Hydra copies the cache into every job of a sweep, so each invocation creates one folder.)
    """
    from kdx.io import create_unique_folder

    if resume is None or resume is False or str(resume).lower() in ("false", "none", "null", ""):
        return str(create_unique_folder(base, str(stamp)))
    if resume is True or str(resume).lower() == "true":
        latest = latest_run(base)
        return str(latest) if latest is not None else f"{base}/{stamp}"
    return str(resume)


def register_resolvers() -> None:
    """Register `${kdx.run_dir:resume,base,stamp}` (used by hydra.run.dir and hydra.sweep.dir in train.yaml)."""
    if not OmegaConf.has_resolver("kdx.run_dir"):
        OmegaConf.register_new_resolver("kdx.run_dir", resolve_run_dir, use_cache=True)


register_resolvers()


def set_aside(run_dir: Path, tag: str, keep: tuple[str, ...] = (".hydra", LOCK_FILE)) -> Path:
    """Move the contents of `run_dir` (except Hydra's files of the current invocation) into a sibling
    folder `<name>.<tag>-<time>`; return that folder. Nothing is deleted."""
    target = run_dir.with_name(f"{run_dir.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    target.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name in keep or (entry.is_file() and entry.suffix == ".log"):  # Hydra's log of this invocation
            continue
        entry.rename(target / entry.name)
    return target


# ---------------------------------------------------------------- type checks of overrides

# keys whose default is a boolean but which also take text: `pretrained` is true/false, a weights name or a file
TEXT_OR_BOOL_KEYS = ("pretrained",)


def check_override_types(cfg: DictConfig, reference: DictConfig, overrides: list[str]) -> None:
    """Raise a ConfigError naming key and value when an override gives text where the defaults hold a number
    or a boolean (e.g. distill.temperature=abc)."""
    for item in overrides:
        key, sep, raw = item.lstrip("+~").partition("=")
        if not sep or "." not in key or key.startswith("hydra."):
            continue
        expected = OmegaConf.select(reference, key, default=None, throw_on_missing=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if expected is None or value is None or isinstance(value, (DictConfig,)) or OmegaConf.is_list(value):
            continue
        if isinstance(expected, bool) and not isinstance(value, bool) and key.rsplit(".", 1)[-1] not in TEXT_OR_BOOL_KEYS:
            raise ConfigError(f"{key}={raw}: {key} must be true or false, got {value!r}")
        if isinstance(expected, (int, float)) and not isinstance(expected, bool) and isinstance(value, str):
            try:
                float(value)
            except ValueError:
                raise ConfigError(f"{key}={raw}: {key} must be a number (default {expected!r}), got {value!r}") from None


# ---------------------------------------------------------------- end of a sweep

def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep (those holding Hydra's .hydra or a results.json), set-aside copies excluded."""
    found = []
    for path in sorted(sweep_dir.rglob(RESULTS_FILE)):
        job = path.parent
        if not any(m in part for part in job.relative_to(sweep_dir).parts for m in SET_ASIDE_MARKERS):
            found.append(job)
    return found


def summarize_sweep(sweep_dir: Path, since: float | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(completed job folders, [(failed job folder, error)]) of a sweep; with `since`, only failures recorded after it."""
    done, failed = [], []
    for job in job_dirs(sweep_dir):
        results = read_results(job) or {}
        if results.get("status") == "completed":
            done.append(job)
        elif since is not None and (job / RESULTS_FILE).stat().st_mtime < since - 1:
            continue  # an earlier invocation's failure that this one did not run again
        else:
            failed.append((job, str(results.get("error") or f"status {results.get('status')!r}")))
    return done, failed


_SWEEP_DIR: Path | None = None  # the folder of the sweep this process runs (set when the multirun starts)


def current_sweep_dir() -> Path | None:
    """The folder of the sweep running in this process, or None outside a multirun."""
    return _SWEEP_DIR


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra < 1.1
    _HydraCallback = object  # type: ignore[assignment,misc]


class SweepSummary(_HydraCallback):
    """Hydra callback: says where a sweep writes and how to re-run it; at the end lists failed jobs and exits
    non-zero when any failed (the other jobs still ran)."""

    def __init__(self) -> None:
        self._started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _SWEEP_DIR
        self._started = time.time()
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        _SWEEP_DIR = sweep_dir
        print(f"[kdx] sweep folder: {sweep_dir}  (to re-run it, skipping finished jobs: add resume={sweep_dir})",
              flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if not sweep_dir.is_dir():
            return
        done, failed = summarize_sweep(sweep_dir, since=self._started)
        print(f"[kdx] sweep finished: {len(done)} job(s) completed, {len(failed)} failed, in {sweep_dir}", flush=True)
        if failed:
            for job, error in failed:
                print(f"[kdx]   failed: {job.relative_to(sweep_dir)}: {error.splitlines()[0] if error else ''}",
                      file=sys.stderr, flush=True)
            print(f"[kdx] re-run the failed jobs with the same command plus resume={sweep_dir}", file=sys.stderr,
                  flush=True)
            sys.stdout.flush()
            sys.exit(1)


def job_return_value(results: dict[str, Any] | None, metric: str | None = None) -> float:
    """What a sweep job returns to the sweeper (Optuna): `metric`, else the best value of the monitored
    metric, else its last value; NaN for a failed job or a missing metric."""
    if not results or results.get("status") != "completed":
        return math.nan
    metrics = results.get("metrics") or {}
    monitor = (results.get("monitor") or {}).get("metric")
    for key in ([metric] if metric else [f"best_{monitor}", monitor]):
        if key and metrics.get(key) is not None:
            return float(metrics[key])
    return math.nan


# ---------------------------------------------------------------- DDP inside a multirun

EXTERNAL_LAUNCH_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def world_size(trainer_cfg: dict[str, Any]) -> int:
    """Processes a trainer config asks for (devices x nodes); 'auto'/-1 count as many (2)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    else:
        try:
            n = int(devices)
        except (TypeError, ValueError):
            n = 2  # "auto": may be several
        n = 2 if n == -1 else n
    return n * int(trainer_cfg.get("num_nodes", 1) or 1)


def launched_externally() -> bool:
    """True when a cluster (SLURM with one task per device, torchrun) already started one process per rank."""
    if any(k in os.environ for k in EXTERNAL_LAUNCH_ENV):
        return True
    try:
        return int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def needs_isolated_ddp(trainer_cfg: dict[str, Any]) -> bool:
    """True when a multirun job asks for DDP that Lightning would launch by re-running the script."""
    strategy = str(trainer_cfg.get("strategy", "auto") or "auto")
    return strategy.startswith("ddp") and "spawn" not in strategy and "notebook" not in strategy \
        and world_size(trainer_cfg) > 1 and not launched_externally()


def run_ddp_worker(run_dir: Path, resume_ckpt: Path | None) -> int:
    """Train the config saved in `run_dir` in a fresh process (`python -m kdx.ddp_worker RUN_DIR`); its exit code."""
    import subprocess

    env = dict(os.environ)
    env[RESUME_CKPT_ENV] = str(resume_ckpt) if resume_ckpt else ""
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(key, None)
    return subprocess.call([sys.executable, "-m", "kdx.ddp_worker", str(run_dir)], env=env)
