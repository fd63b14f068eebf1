"""The run-folder policy: where a run or sweep writes (`resume=`), what a new start does with a folder that
already holds a run (skip it, resume it, set it aside, or refuse), and the jobs of a sweep folder (the
end-of-sweep summary, what each job returns to the sweeper).

It knows nothing of training: which parts of a config make up a run's identity is passed in by the caller
(kdx.train.run_identity), so this layer sits right above kdx.io. It is light to import (no torch), so Hydra
loads SweepSummary and the `${kdx.run_dir:...}` resolver at once.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdx.errors import CheckpointError, ConfigError, RunExistsError
from kdx.io import (LOCK_FILE, RESULTS_FILE, SET_ASIDE_MARKERS, config_hash, create_unique_folder, read_results)
from kdx.ranks import launch_rank, launch_stamp

RESUME_CKPT_ENV = "KDX_RESUME_CKPT"  # checkpoint that rank 0 resumes from, inherited by the other ranks
LAST_CKPT = Path("checkpoints") / "last.ckpt"
RESUME_KEYS = {"resume": False, "force": False}  # how to run, not what: left out of the config hash

Identity = Callable[[DictConfig], dict[str, Any]]


# ---------------------------------------------------------------- where a run or sweep writes (`resume=`)

def latest_run(base: str | Path) -> Path | None:
    """The newest run folder directly under `base` (timestamped names sort by time), or None."""
    base = Path(base)
    if not base.is_dir():
        return None
    runs = sorted(p for p in base.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not any(m in p.name for m in SET_ASIDE_MARKERS))
    return runs[-1] if runs else None


def is_resume_off(value: Any) -> bool:
    """True when a `resume` value means: start a new run (false, null, an empty string)."""
    return value is None or value is False or str(value).lower() in ("false", "none", "null", "")


def resolve_run_dir(resume: Any, base: str, stamp: str) -> str:
    """Hydra's run (or sweep) folder: `base/stamp` for a new run, the newest folder under `base` for
    `resume=true`, or the folder given as `resume=PATH`.

    A new run's folder is created here, atomically (kdx.io.create_unique_folder): two runs started in the
    same second get `base/stamp` and `base/stamp-2` instead of sharing one folder. (The resolver is cached,
    and Hydra copies the cache into every job of a sweep, so each invocation creates one folder.)
    In a job that torchrun or srun started as several processes, every process takes `base/<job id>`
    (kdx.ranks.launch_stamp) and only rank 0 creates it; what to do with an existing one is the run policy's.
    """
    if is_resume_off(resume):
        shared = launch_stamp(str(stamp))
        if shared != str(stamp):
            if launch_rank() == 0:
                Path(base, shared).mkdir(parents=True, exist_ok=True)
            return f"{base}/{shared}"
        return str(create_unique_folder(base, str(stamp)))
    if resume is True or str(resume).lower() == "true":
        latest = latest_run(base)
        return str(latest) if latest is not None else f"{base}/{stamp}"
    return str(resume)


def hydra_output_subdir(force: Any = False, subdir: str = ".hydra") -> str | None:
    """Where Hydra saves a job's config.yaml, hydra.yaml and overrides.yaml (`hydra.output_subdir`): `subdir`,
    or None (nothing saved) when the job's folder already holds a finished run and force= is off, and on ranks > 0
    of a job torchrun or srun started (they share rank 0's folder).

    Hydra writes those files before the job starts, so without this a re-run that skips or refuses a finished
    run would overwrite the files that describe how it was made. Hydra reads `hydra.output_subdir` right after
    setting the job's output folder, which is where this looks.
    """
    from hydra.core.hydra_config import HydraConfig  # light; Hydra is loaded whenever this resolver runs

    if launch_rank() != 0:  # the other processes of a torchrun/srun job: rank 0 writes the job's files
        return None
    if not is_resume_off(force) and str(force).lower() != "0":  # force=true replaces the run: its files too
        return subdir
    try:
        output_dir = HydraConfig.get().runtime.output_dir
    except Exception:  # no Hydra job (composing in a test, a script): nothing is written anyway
        return subdir
    results = read_results(Path(str(output_dir))) if output_dir else None
    return None if results and results.get("status") == "completed" else subdir


def register_resolvers() -> None:
    """Register `${kdx.run_dir:resume,base,stamp}` (used by hydra.run.dir and hydra.sweep.dir in train.yaml) and
    `${kdx.output_subdir:force}` (hydra.output_subdir: Hydra's files of a finished run are left as they are)."""
    if not OmegaConf.has_resolver("kdx.run_dir"):
        OmegaConf.register_new_resolver("kdx.run_dir", resolve_run_dir, use_cache=True)
    if not OmegaConf.has_resolver("kdx.output_subdir"):
        OmegaConf.register_new_resolver("kdx.output_subdir", hydra_output_subdir, use_cache=False)


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


# ---------------------------------------------------------------- what a new start does with an existing run

def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def config_changes(run_dir: Path, cfg: DictConfig, identity: Identity) -> list[str]:
    """`key (old -> new)` for every key of the run's identity that differs between the config saved in
    `run_dir/config.yaml` and `cfg`; ["config.yaml"] when the saved config cannot be read."""
    try:
        saved = identity(OmegaConf.load(run_dir / "config.yaml"))
    except Exception:
        return ["config.yaml (missing or unreadable)"]
    old, new = _flatten(saved), _flatten(identity(cfg))
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            shown = lambda v: "unset" if v is missing else repr(v)  # noqa: E731
            changes.append(f"{key} ({shown(a)} -> {shown(b)})")
    return changes


def check_run_dir(run_dir: Path, cfg: DictConfig | None, identity: Identity,
                  multirun: bool = False) -> tuple[str, Path | None, dict | None]:
    """Decide what to do with `run_dir`: ("skip", None, results) for a finished run that is re-run,
    ("resume", last.ckpt, results) for an interrupted one, ("fresh", None, None) otherwise.

    A finished run is never overwritten: a single run without resume=/force= raises RunExistsError, force=true
    moves the old files to `<folder>.replaced-<time>` first. resume=true on a folder with no checkpoint raises
    CheckpointError naming it; on one whose config differs from `cfg` (compared by `identity`) a ConfigError
    naming the changed keys (resume=true force=true continues it with the new config). An interrupted run is
    never trained over: without resume= or force= that is a RunExistsError. In a multirun, finished jobs are
    skipped and interrupted ones with the same config resumed (a changed one is set aside).
    """
    run_dir = Path(run_dir)
    resume = not is_resume_off(cfg.get("resume", False)) if cfg is not None else False
    force = bool(cfg.get("force", False)) if cfg is not None else False
    results = read_results(run_dir)
    same = results is not None and cfg is not None and results.get("config_hash") == config_hash(identity(cfg))
    last = run_dir / LAST_CKPT
    if results and results.get("status") == "completed":
        if force:
            print(f"[kdx] force=true: the finished run in {run_dir} moved to {set_aside(run_dir, 'replaced')}", flush=True)
            return "fresh", None, None
        if (resume or multirun) and same:
            return "skip", None, results
        if resume or multirun:
            changes = config_changes(run_dir, cfg, identity) if cfg is not None else []
            shown = (", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
                     if changes else "its config hash")
            raise RunExistsError(f"{run_dir} already holds a finished run made with a different config (it differs "
                                 f"in {shown}); run the sweep with the settings it was made with, pass force=true to "
                                 f"rerun it (the old one is kept as {run_dir.name}.replaced-TIME), or choose another "
                                 f"folder")
        raise RunExistsError(f"{run_dir} already holds a finished run ({RESULTS_FILE}); resume=true reports it, "
                             f"force=true reruns it (keeping the old one), or choose another output folder "
                             f"(hydra.run.dir=...)")
    if resume and not multirun:
        if not last.is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: it holds no checkpoint ({LAST_CKPT}); "
                                  f"point resume=PATH at the run folder of the interrupted run, or drop resume=")
        changes = config_changes(run_dir, cfg, identity) if cfg is not None else []
        if changes and not force:
            shown = ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
            raise ConfigError(f"cannot resume {run_dir}: the config differs from the interrupted run's in {shown}; "
                              f"resume with the settings it was started with, or add force=true to continue from its "
                              f"checkpoint with the new ones")
        if changes:
            print(f"[kdx] force=true: resuming {run_dir} with a changed config: {', '.join(changes)}", flush=True)
        return "resume", last, results
    if force and run_dir.is_dir() and (results is not None or last.exists()):
        print(f"[kdx] force=true: the unfinished run in {run_dir} moved to {set_aside(run_dir, 'replaced')}", flush=True)
        return "fresh", None, None
    if multirun and last.is_file():
        if same:
            return "resume", last, results
        print(f"[kdx] {run_dir} holds an unfinished run with a different config; moved to "
              f"{set_aside(run_dir, 'incomplete')}", flush=True)
        return "fresh", None, None
    if last.is_file():
        raise RunExistsError(f"{run_dir} holds an unfinished run ({LAST_CKPT}); resume={run_dir} continues it, "
                             f"force=true starts over (keeping the old files as {run_dir.name}.replaced-TIME), or "
                             f"choose another output folder (hydra.run.dir=...)")
    return "fresh", None, None


def without_resume_keys(overrides: list[str]) -> list[str]:
    """`overrides` less resume=/force= (how to run, not what)."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in RESUME_KEYS]


def default_resume_command(overrides: list[str], run_dir: Path) -> str:
    """The kdx-train command line that continues the run in `run_dir`."""
    kept = [o for o in without_resume_keys(overrides) if o.lstrip("+~").split("=", 1)[0] != "hydra.run.dir"]
    return " ".join(["kdx-train", *map(shlex.quote, kept), shlex.quote(f"resume={run_dir}")])


# ---------------------------------------------------------------- the jobs of a sweep folder

def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep (those holding a results.json), set-aside copies excluded."""
    found = []
    for path in sorted(sweep_dir.rglob(RESULTS_FILE)):
        job = path.parent
        if not any(m in part for part in job.relative_to(sweep_dir).parts for m in SET_ASIDE_MARKERS):
            found.append(job)
    return found


REFUSED_DIR = ".kdx-refused"  # under a sweep folder: jobs refused since a finished run in their folder differs


def _refusal_file(sweep_dir: Path, job_dir: Path) -> Path:
    rel = Path(job_dir).resolve().relative_to(Path(sweep_dir).resolve())
    return Path(sweep_dir) / REFUSED_DIR / ("__".join(rel.parts) + ".json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_refusal(sweep_dir: Path, job_dir: Path, error: BaseException | str) -> None:
    """Note that a sweep job refused to run in `job_dir` (a finished run is there, made with another config).

    The finished run's own files are left untouched (its results.json still says completed), so the refusal is
    recorded beside them, under the sweep folder, where the end-of-sweep summary counts it as a failure.
    """
    from kdx.io import write_json

    try:
        path = _refusal_file(sweep_dir, job_dir)
    except ValueError:  # the job's folder is not inside the sweep folder: nothing to count it in
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"run_dir": str(job_dir), "error": f"{type(error).__name__}: {error}"
                      if isinstance(error, BaseException) else str(error), "at": time.time()})


def summarize_sweep(sweep_dir: Path, since: float | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(completed job folders, [(failed job folder, error)]) of a sweep; with `since`, only failures recorded after it.
    A finished job that this invocation refused to re-run with another config (record_refusal) is a failure."""
    done, failed = [], []
    for job in job_dirs(sweep_dir):
        results = read_results(job) or {}
        refusal = _refusal_file(sweep_dir, job)
        if refusal.is_file() and (since is None or refusal.stat().st_mtime >= since - 1):
            failed.append((job, str(_read_json(refusal).get("error") or "refused")))
        elif results.get("status") == "completed":
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


class SweepSummary(Callback):
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
        if not sweep_dir.is_dir() or launch_rank() != 0:  # ranks > 0 of a torchrun/srun job: rank 0 reports
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
