"""A kdx-tune study: its folder and storage, the checks before any trial, the trial loop and its worker processes.

The study folder (`hydra.run.dir`, default studies/<run_name>) holds:
- `study.db`: the Optuna storage (SQLite; `tune.storage` names another), which is the study's memory: re-running
  the same command continues it;
- `trials/<number>/`: one kdx-train run folder per trial (kdx.train.run_training);
- `teacher_cache/`: the teacher's outputs, shared by the trials of methods that read only those;
- `report.md`, `trials.png`, `best.json`: written at the end of every invocation (kdx.tune.report).

Rules:
- `tune.trials` counts finished trials (complete or pruned). A trial that fails (an error, a NaN, Ctrl-C, or a
  process killed with it RUNNING) is kept as FAIL and does not count, so a re-run starts a new trial in its place;
  its run folder stays as it was. Trials still RUNNING when an invocation starts were left by a killed one (the
  folder is claimed, so no other kdx-tune is running on it): they are marked FAIL first.
- A study is defined by its settings (the kdx-train overrides and the `tune` keys other than trials, jobs, threads,
  timeout and max_failures); a re-run with other settings is refused rather than mixed into the same study.
- Workers take trials under a file lock that counts the finished and running ones, so parallel workers stop at
  exactly `tune.trials`.
- Each trial's value is the best value of `tune.metric` (a `val/` metric) over its epochs; test metrics, which every
  kdx-train run records, are never read here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from kdx.configs import to_dict
from kdx.distill import Distiller, distiller_class, split_distill_config
from kdx.errors import ConfigError, KdxError, RunInterrupted
from kdx.io import atomic_write_text, claim_folder, release_folder
from kdx.launcher import plan_cores
from kdx.tasks import validate_config
from kdx.train import run_training
from kdx.tune.callback import TrialReporter, entry_point_installed, reporting
from kdx.tune.compose import compose_trial, ensure_hydra
from kdx.tune.report import write_report
from kdx.tune.settings import (Setting, TuneSettings, base_overrides, check_storage, override_key, override_value,
                               storage_url)

TRIALS_DIR = "trials"
CACHE_DIR = "teacher_cache"
WORKERS_FILE = "workers.json"
ASK_LOCK = ".tune-ask.lock"
IDENTITY_ATTR = "kdx_identity"
_MISSING = object()


def _say(message: str) -> None:
    print(f"[kdx-tune] {message}", flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------- overrides
def trial_overrides(base: Sequence[str], method: str, params: dict[str, Any], cache_dir: Path | None,
                    extra: Sequence[str] = ()) -> list[str]:
    """A trial's kdx-train overrides: the user's, the method's preset, the sampled settings, the shared cache."""
    out = [*base, f"distill={method}", *(f"{path}={override_value(v)}" for path, v in params.items())]
    if cache_dir is not None:
        out += ["distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={override_value(str(cache_dir))}"]
    return [*out, *extra]


# --------------------------------------------------------------------------- storage
def open_storage(url: str) -> optuna.storages.RDBStorage:
    kwargs = {"connect_args": {"timeout": 300}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 - a driver error, a locked or corrupt file: one sentence
        raise ConfigError(f"tune.storage {url} cannot be opened ({_first_line(e)}); check the URL, or leave "
                          f"tune.storage=null for the study folder's study.db") from None


def make_sampler(settings: TuneSettings, worker: int = 0) -> optuna.samplers.BaseSampler:
    seed = settings.seed + worker
    if settings.sampler["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # multivariate TPE over groups of settings that appear together: each method's settings are modelled jointly,
    # and only with the trials of that method (the space is conditional on the method); constant liar keeps
    # parallel workers from proposing the same point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.sampler["startup_trials"],
                                          multivariate=True, group=True, constant_liar=settings.jobs > 1)


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    p = settings.pruner
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p["startup_trials"], n_warmup_steps=p["min_epochs"])
    if p["name"] == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p["min_epochs"],
                                                     reduction_factor=p["reduction_factor"])
    return optuna.pruners.NopPruner()


def load_study(settings: TuneSettings, url: str, name: str, worker: int = 0) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url), sampler=make_sampler(settings, worker),
                             pruner=make_pruner(settings))


@contextmanager
def _ask_lock(study_dir: Path) -> Iterator[None]:
    """One worker at a time counts the trials and takes the next one (an flock, gone with a killed holder)."""
    fd = os.open(study_dir / ASK_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: parallel workers may run a trial or two over
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


# --------------------------------------------------------------------------- the checks before any trial
@dataclass
class Plan:
    """What every worker needs to run trials (JSON-ready: it is handed to worker processes in a file)."""

    study_dir: str
    storage: str
    study_name: str
    settings: dict[str, Any]
    base: list[str]
    search_path: list[str]
    config_dir: str
    cached: list[str]                      # methods whose trials share the study's teacher cache
    extra: list[str] = field(default_factory=list)  # overrides of parallel workers (loader workers, progress)
    threads: int | None = None
    started: float = 0.0


def _preflight(settings: TuneSettings, base: list[str], search_path: list[str]) -> tuple[list[str], dict[str, dict]]:
    """Compose and validate each method's trial config (its preset values, then every setting at its low and at its
    high end), so a bad key or bound is refused before any training. Returns (the methods that may share the
    teacher cache, each method's baseline: the preset's values of its searched settings, where inside the space)."""
    fixed = {override_key(o) for o in base}
    for m in settings.methods:
        for s in settings.space[m]:
            if s.path in fixed:
                raise ConfigError(f"{s.path} is set on the command line and searched by {s.key}; drop one of them")
    user_cache = any(k.startswith("distill.teacher_cache") for k in fixed)
    cached, baselines = [], {}
    for m in settings.methods:
        cfg = compose_trial(trial_overrides(base, m, {}, None), search_path, f"method {m}")
        task = validate_config(cfg)
        if not task.distills:
            raise ConfigError(f"kdx-tune searches distillation settings, but task={cfg.task.name} trains without a "
                              f"teacher; use a distillation experiment (experiment=fmnist/kd, task=distill)")
        ckpt = cfg.teacher.get("ckpt")
        if ckpt and not Path(str(ckpt)).expanduser().is_file():
            raise ConfigError(f"teacher.ckpt={ckpt} is not a file; give the teacher's checkpoint "
                              f"(<teacher run>/checkpoints/best.ckpt)")
        baseline = {}
        for s in settings.space[m]:
            value = OmegaConf.select(cfg, s.path, default=_MISSING)
            if value is _MISSING:
                raise ConfigError(f"{s.key}: the config of method {m} has no key {s.path}; search keys that "
                                  f"kdx-train --cfg job experiment=... distill={m} shows")
            if s.contains(value):
                baseline[s.path] = value
        baselines[m] = baseline
        for end in ("low", "high"):
            params = {s.path: _end(s, end) for s in settings.space[m]}
            if not params:
                continue
            try:
                validate_config(compose_trial(trial_overrides(base, m, params, None), search_path, f"method {m}"))
            except ConfigError as e:
                raise ConfigError(f"tune.space.{m} at its {end} end is refused: {e}") from None
        entries = split_distill_config(to_dict(cfg.distill) or {})
        outputs_only = all(distiller_class(name).teacher_layers is Distiller.teacher_layers for name, *_ in entries)
        searched_cache = any(s.path.startswith("distill.teacher_cache") for s in settings.space[m])
        if settings.teacher_cache == "auto" and outputs_only and not user_cache and not searched_cache:
            cached.append(m)
    return cached, baselines


def _end(s: Setting, end: str) -> Any:
    if s.kind == "categorical":
        return s.choices[0] if end == "low" else s.choices[-1]
    return s.low if end == "low" else s.high


def _identity(settings: TuneSettings, base: list[str]) -> dict[str, Any]:
    return json.loads(json.dumps({"overrides": sorted(base), "tune": settings.identity()}, default=str))


def _differences(stored: dict[str, Any], now: dict[str, Any]) -> str:
    parts = []
    then_o, now_o = set(stored.get("overrides", [])), set(now["overrides"])
    if then_o != now_o:
        parts.append("overrides " + "; ".join(
            [f"now {', '.join(sorted(now_o - then_o))}" if now_o - then_o else "",
             f"then {', '.join(sorted(then_o - now_o))}" if then_o - now_o else ""]).strip("; "))
    then_t, now_t = stored.get("tune", {}), now["tune"]
    keys = sorted(k for k in set(then_t) | set(now_t) if then_t.get(k) != now_t.get(k))
    if keys:
        parts.append("tune." + ", tune.".join(keys))
    return "; ".join(parts) or "its settings"


def _open_study(settings: TuneSettings, url: str, name: str, identity: dict[str, Any], study_dir: Path) -> optuna.Study:
    """Create the study, or load it and check that it is the same search; fail the trials a killed run left."""
    study = optuna.create_study(study_name=name, storage=open_storage(url), sampler=make_sampler(settings),
                                pruner=make_pruner(settings), direction=settings.direction, load_if_exists=True)
    stored = study.user_attrs.get(IDENTITY_ATTR)
    trials = study.get_trials(deepcopy=False)
    if stored is None and trials:
        raise ConfigError(f"the storage {url} already holds a study named {name} with {len(trials)} trial(s) that "
                          f"kdx-tune did not make; choose another tune.storage or run_name")
    if stored is not None and stored != identity:
        raise ConfigError(f"{study_dir} holds a study made with other settings ({_differences(stored, identity)}); "
                          f"re-run it with the same settings (only tune.trials, jobs, threads, timeout and "
                          f"max_failures may change), or start another study with hydra.run.dir=DIR or run_name=NAME")
    if [d for d in study.directions] != [optuna.study.StudyDirection.MAXIMIZE if settings.maximize
                                         else optuna.study.StudyDirection.MINIMIZE]:
        raise ConfigError(f"the study {name} in {url} was made to {study.directions[0].name.lower()}; "
                          f"give tune.direction the same, or another run_name")
    if stored is None:
        trials_dir = study_dir / TRIALS_DIR
        if trials_dir.is_dir() and any(trials_dir.iterdir()):
            raise ConfigError(f"{trials_dir} holds trial runs of a study whose storage is not {url}; move that folder "
                              f"away (its runs stay yours) or choose another hydra.run.dir")
        study.set_user_attr(IDENTITY_ATTR, identity)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "error", "its process was killed while it ran")
        study.tell(t.number, state=TrialState.FAIL)
        _say(f"trial {t.number} was running when the study was stopped; marked failed (it does not count toward "
             f"tune.trials; its folder is kept)")
    return study


def _enqueue_first(study: optuna.Study, settings: TuneSettings, baselines: dict[str, dict]) -> None:
    """A new study's first trials: tune.enqueue as given, then each method at its preset's values (tune.baseline)."""
    first = [(e["method"], e["params"]) for e in settings.enqueue]
    if settings.baseline:
        first += [(m, baselines[m]) for m in settings.methods]
    for method, params in first:
        names = {s.path: s.param_name for s in settings.space[method]}
        study.enqueue_trial({"method": method, **{names[p]: v for p, v in params.items()}}, skip_if_exists=True)


# --------------------------------------------------------------------------- trials
def run_trial(study: optuna.Study, trial: optuna.Trial, plan: Plan, settings: TuneSettings, worker: str) -> str:
    """One trial: sample, compose, train (kdx.train.run_training) with the reporter attached, tell the study.
    Returns complete, pruned or fail; Ctrl-C marks the trial failed and raises RunInterrupted."""
    method = trial.suggest_categorical("method", list(settings.methods))
    params = {s.path: s.suggest(trial) for s in settings.space[method]}
    cache = Path(plan.study_dir) / CACHE_DIR if method in plan.cached else None
    overrides = trial_overrides(plan.base, method, params, cache, plan.extra)
    run_dir = Path(plan.study_dir) / TRIALS_DIR / f"{trial.number:04d}"
    for key, value in (("method", method), ("settings", params), ("overrides", overrides),
                       ("run_dir", str(run_dir)), ("worker", worker)):
        trial.set_user_attr(key, value)
    shown = ", ".join(f"{p}={v}" for p, v in params.items()) or "its preset's values"
    _say(f"trial {trial.number} ({worker}): {method}, {shown} -> {run_dir}")
    reporter = TrialReporter(trial, settings.metric, settings.maximize)
    try:
        cfg = compose_trial(overrides, plan.search_path, f"trial {trial.number}")
        with reporting(reporter):
            run_training(cfg, run_dir, overrides)
    except (RunInterrupted, KeyboardInterrupt) as e:
        trial.set_user_attr("epochs", reporter.epochs)
        trial.set_user_attr("error", "interrupted (Ctrl-C)")
        study.tell(trial, state=TrialState.FAIL)
        if isinstance(e, RunInterrupted):
            raise
        raise RunInterrupted(f"trial {trial.number} interrupted") from None
    except Exception as e:  # noqa: BLE001 - a failed trial is a result of the search; the study goes on
        kind = "" if isinstance(e, KdxError) else f"{type(e).__name__}: "
        trial.set_user_attr("epochs", reporter.epochs)
        trial.set_user_attr("error", f"{kind}{_first_line(e)}")
        study.tell(trial, state=TrialState.FAIL)
        _say(f"trial {trial.number} failed: {kind}{_first_line(e)}")
        return "fail"
    trial.set_user_attr("epochs", reporter.epochs)
    if reporter.pruned_at is not None:
        trial.set_user_attr("pruned_after_epoch", reporter.pruned_at + 1)
        study.tell(trial, state=TrialState.PRUNED)
        _say(f"trial {trial.number} pruned after epoch {reporter.pruned_at + 1} "
             f"({settings.metric} {reporter.values[-1][1]:.4f})")
        return "pruned"
    best = reporter.best()
    if best is None:
        error = (f"no finite value of {settings.metric} was reported (is kdx installed with its entry points, "
                 f"pip install -e .?)")
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        _say(f"trial {trial.number} failed: {error}")
        return "fail"
    study.tell(trial, best)
    _say(f"trial {trial.number} finished: best {settings.metric} {best:.4f} over {reporter.epochs} epoch(s)")
    return "complete"


def worker_loop(plan: Plan, worker: int = 0) -> int:
    """Take and run trials until the study holds tune.trials finished ones (or tune.timeout has passed, or
    tune.max_failures trials failed in a row). Returns the number of trials this worker ran."""
    settings = TuneSettings.from_dict(plan.settings)
    ensure_hydra(plan.config_dir)
    study = load_study(settings, plan.storage, plan.study_name, worker)
    name = f"worker {worker}, pid {os.getpid()}"
    ran = failures = 0
    while True:
        if settings.timeout is not None and time.time() - plan.started >= settings.timeout:
            _say(f"tune.timeout ({settings.timeout:g} s) has passed; {name} starts no more trials")
            break
        with _ask_lock(Path(plan.study_dir)):
            counted = len(study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING)))
            if counted >= settings.trials:
                break
            trial = study.ask()
        outcome = run_trial(study, trial, plan, settings, name)
        ran += 1
        failures = failures + 1 if outcome == "fail" else 0
        if failures >= settings.max_failures:
            error = study.trials[trial.number].user_attrs.get("error", "see above")
            raise KdxError(f"{failures} trials failed in a row (tune.max_failures), the last with: {error}; fix the "
                           f"cause and re-run the same command (failed trials do not count toward tune.trials)")
    return ran


# --------------------------------------------------------------------------- parallel workers
def _run_workers(plan: Plan, study_dir: Path, jobs: int) -> list[int]:
    """tune.jobs worker processes (python -m kdx.tune.worker), each with its share of the cores; their exit codes."""
    spec = study_dir / WORKERS_FILE
    atomic_write_text(spec, json.dumps(plan.__dict__, indent=2) + "\n")
    env = dict(os.environ)
    if plan.threads:
        env.update(OMP_NUM_THREADS=str(plan.threads), MKL_NUM_THREADS=str(plan.threads))
    procs = [subprocess.Popen([sys.executable, "-m", "kdx.tune.worker", str(spec), str(k), str(os.getpid())], env=env)
             for k in range(jobs)]
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them mark their trials and stop
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise RunInterrupted("the study was interrupted") from None


# --------------------------------------------------------------------------- the whole search
def run_study(cfg: DictConfig, study_dir: str | Path, overrides: Sequence[str], settings: TuneSettings, *,
              search_path: Sequence[str] = (), config_dir: str) -> dict[str, Any]:
    """Run (or continue) the study of `cfg` in `study_dir` until it holds `tune.trials` finished trials; write its
    report. Returns the report's summary (kdx.tune.report.write_report) plus `worker_codes`."""
    study_dir = Path(study_dir).resolve()
    if not entry_point_installed():
        raise KdxError("kdx-tune stops poor trials through a Lightning callback that kdx registers when it is "
                       "installed, and this environment lacks it; reinstall kdx (pip install -e . in its checkout)")
    base = base_overrides(overrides)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(settings, study_dir)
    check_storage(url)
    claim_folder(study_dir)  # one kdx-tune per study folder: a second one is refused with the first one's pid
    try:
        ensure_hydra(config_dir)
        cached, baselines = _preflight(settings, base, list(search_path))
        name = str(cfg.get("run_name") or "kdx-tune")
        identity = _identity(settings, base)
        study = _open_study(settings, url, name, identity, study_dir)
        if not study.get_trials(deepcopy=False):
            _enqueue_first(study, settings, baselines)
        plan_ = plan_cores(settings.jobs, settings.jobs)
        extra: list[str] = []
        threads = settings.threads
        if settings.jobs > 1:
            probe = compose_trial(trial_overrides(base, settings.methods[0], {}, None), list(search_path), "the study")
            configured = probe.data.get("num_workers") if "data" in probe else None
            auto_threads, workers = plan_.job_settings(configured)
            threads = threads or auto_threads
            if workers is not None and configured is not None and workers != int(configured):
                extra.append(f"data.num_workers={workers}")
            if not any(override_key(o) == "trainer.progress_bar" for o in base):
                extra.append("trainer.progress_bar=log")  # one line per epoch: bars of several processes garble
        plan = Plan(study_dir=str(study_dir), storage=url, study_name=name, settings=settings.as_dict(), base=base,
                    search_path=list(search_path), config_dir=config_dir, cached=cached, extra=extra,
                    threads=threads, started=time.time())
        done = finished_count(study)
        _say(f"study {name} in {study_dir}: {done} of {settings.trials} trials finished; storage {url}; "
             f"{settings.metric} ({settings.direction}); methods {', '.join(settings.methods)}")
        if cached:
            _say(f"teacher cache shared by the trials of {', '.join(cached)}: {study_dir / CACHE_DIR}")
        codes: list[int] = []
        stopped: KdxError | None = None
        if done >= settings.trials:
            _say(f"the study already holds {done} finished trials (tune.trials={settings.trials}); raise tune.trials "
                 f"to search further")
        elif settings.jobs == 1:
            import torch

            previous = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                worker_loop(plan, 0)
            except KdxError as e:  # Ctrl-C (RunInterrupted) or tune.max_failures: the report is written first
                stopped = e
            finally:
                torch.set_num_threads(previous)
        else:
            _say(f"{settings.jobs} worker processes, {threads} torch thread(s) each ({plan_.cores} cores)")
            try:
                codes = _run_workers(plan, study_dir, settings.jobs)
            except RunInterrupted as e:
                stopped = e
        summary = write_report(load_study(settings, url, name), study_dir, settings)
        summary["worker_codes"] = codes
        if isinstance(stopped, RunInterrupted):
            raise RunInterrupted(f"the study was interrupted; {summary['report']} shows the trials so far; re-run the "
                                 f"same command to continue it") from None
        if stopped is not None:
            raise stopped
        bad = [f"worker {k} (exit code {c})" for k, c in enumerate(codes) if c != 0]
        if bad:
            raise KdxError(f"{', '.join(bad)} stopped early, as said above; {summary['report']} shows the trials so "
                           f"far; re-run the same command to continue the study")
        return summary
    finally:
        release_folder(study_dir)
