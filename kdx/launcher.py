"""Sweep jobs side by side on one machine (`hydra/launcher=parallel`): the CPU cores are divided between the jobs.

The Hydra launcher itself is `hydra_plugins.kdx_launcher.ParallelJoblibLauncher` (Hydra only loads launchers
from the `hydra_plugins` package); this module holds what it does to each job, so it can be read and tested
without Hydra:

- each job gets `cores // jobs at a time` cores: that many torch threads, of which up to half may go to
  DataLoader worker processes instead (`data.num_workers` is lowered, never raised); so jobs x (threads +
  workers) stays within the cores. `hydra.launcher.threads_per_job` / `workers_per_job` set them by hand.
- joblib runs each job in a loky worker process, whose multiprocessing start method is loky's own; DataLoader
  workers started from there fail (`'Process' object has no attribute 'env'`, which Lightning reports as
  "Please call iter(combined_loader) first"). Each job runs with the platform's default start method instead.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, open_dict

from kdx.errors import ConfigError
from kdx.progress import JOB_LABEL_ENV

AUTO = "auto"


def available_cores() -> int:
    """CPU cores this process may use (affinity and cgroup limits included), at least 1."""
    try:
        from joblib import cpu_count

        return max(1, int(cpu_count()))
    except Exception:  # joblib missing or unable to tell
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _setting(value: Any, key: str) -> int | None:
    """None for `auto`, else a non-negative int; anything else is a ConfigError naming the key."""
    if value is None or str(value).lower() == AUTO:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0 or str(value).strip() != str(number):
        raise ConfigError(f"hydra.launcher.{key} must be auto or a whole number >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class CorePlan:
    """How a batch of parallel jobs shares the machine."""

    cores: int            # cores available to the whole sweep
    parallel: int         # jobs running at the same time
    cores_per_job: int
    threads: int | None   # torch threads per job; None: cores_per_job minus the job's loader workers
    max_workers: int      # DataLoader worker processes per job at most

    def job_settings(self, configured_workers: int | None) -> tuple[int, int | None]:
        """(torch threads, DataLoader workers) of one job whose data config asks for `configured_workers`."""
        workers = None if configured_workers is None else min(int(configured_workers), self.max_workers)
        threads = self.threads if self.threads is not None else max(1, self.cores_per_job - (workers or 0))
        return threads, workers

    def describe(self) -> str:
        """One sentence for the console: jobs at a time, cores, threads and loader workers per job."""
        threads = (f"{self.threads} torch thread(s)" if self.threads is not None
                   else "its torch threads")
        over = (f"; {self.parallel} jobs on {self.cores} cores must share them, which slows each one down"
                if self.parallel > self.cores else "")
        return (f"{self.parallel} job(s) at a time on {self.cores} CPU core(s): {self.cores_per_job} core(s) per job "
                f"for {threads} and at most {self.max_workers} DataLoader worker(s) (data.num_workers is lowered "
                f"to fit){over}; hydra.launcher.n_jobs, threads_per_job and workers_per_job change this")


def plan_cores(n_jobs: Any, jobs: int, threads_per_job: Any = AUTO, workers_per_job: Any = AUTO,
               cores: int | None = None) -> CorePlan:
    """Divide `cores` (default: all available) between min(n_jobs, jobs) jobs running at once (n_jobs -1: one per core)."""
    cores = int(cores or available_cores())
    try:
        n = int(n_jobs)
    except (TypeError, ValueError):
        raise ConfigError(f"hydra.launcher.n_jobs must be a whole number (-1: one job per core), got {n_jobs!r}") from None
    if n == 0 or n < -1:
        raise ConfigError(f"hydra.launcher.n_jobs must be >= 1 or -1 (one job per core), got {n_jobs!r}")
    parallel = max(1, min(cores if n == -1 else n, max(1, int(jobs))))
    per_job = max(1, cores // parallel)
    threads = _setting(threads_per_job, "threads_per_job")
    if threads == 0:
        raise ConfigError("hydra.launcher.threads_per_job must be at least 1 (or auto), got 0")
    workers = _setting(workers_per_job, "workers_per_job")
    return CorePlan(cores=cores, parallel=parallel, cores_per_job=per_job, threads=threads,
                    max_workers=per_job // 2 if workers is None else workers)


def reset_start_method() -> str | None:
    """Give this process the platform's default multiprocessing start method (loky workers carry loky's, which
    cannot start DataLoader workers); returns the previous method when it was changed, else None."""
    default = multiprocessing.get_all_start_methods()[0]  # the first one is the platform default
    current = multiprocessing.get_start_method(allow_none=True)
    if current in (None, default):
        return None
    multiprocessing.set_start_method(default, force=True)
    return current


def job_label() -> str | None:
    """`job <n>` of the sweep job this process is running (Hydra's job number, the name of its folder), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"job {HydraConfig.get().job.num}" if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - outside Hydra, or a job config without a number
        return None


class ParallelJob:
    """The task function of one parallel sweep job: its share of the cores applied, then the kdx job itself."""

    def __init__(self, task_function: Callable[[DictConfig], Any], plan: CorePlan) -> None:
        self.task_function = task_function
        self.plan = plan

    def __call__(self, cfg: DictConfig) -> Any:
        import torch

        data = cfg.get("data") if isinstance(cfg, DictConfig) else None
        configured = data.get("num_workers") if data is not None and "num_workers" in data else None
        threads, workers = self.plan.job_settings(configured)
        if workers is not None and configured is not None and workers != int(configured):
            with open_dict(cfg):
                cfg.data.num_workers = workers
        note = f"data.num_workers {configured} -> {workers}" if workers != configured else \
            f"data.num_workers {configured}"
        label = job_label()
        print(f"[kdx] parallel job: {threads} torch thread(s), {note} "
              f"({self.plan.cores_per_job} of {self.plan.cores} cores)" + (f", its lines start [{label}]" if label else ""),
              flush=True)
        previous_method = reset_start_method()
        previous_threads = torch.get_num_threads()
        previous_label = os.environ.get(JOB_LABEL_ENV)
        torch.set_num_threads(threads)
        if label:
            os.environ[JOB_LABEL_ENV] = label  # kdx.progress prefixes this job's progress lines with it
        try:
            return self.task_function(cfg)
        finally:
            if previous_label is None:
                os.environ.pop(JOB_LABEL_ENV, None)
            else:
                os.environ[JOB_LABEL_ENV] = previous_label
            torch.set_num_threads(previous_threads)
            if previous_method is not None:
                try:
                    multiprocessing.set_start_method(previous_method, force=True)
                except ValueError:  # the worker's own method is not registered here; the default is fine
                    pass
