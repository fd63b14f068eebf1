"""`hydra/launcher=parallel`: Hydra's joblib launcher with the CPU cores divided between the jobs (see kdx.launcher).

Hydra imports every module under `hydra_plugins` at start-up, so this one imports nothing heavy at the top.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

log = logging.getLogger(__name__)

KDX_KEYS = ("threads_per_job", "workers_per_job")


class ParallelJoblibLauncher(JoblibLauncher):
    """Runs the jobs of a sweep in joblib (loky) worker processes, `n_jobs` at a time, each with its share of cores."""

    def __init__(self, **kwargs: Any) -> None:
        self.kdx_settings = {k: kwargs.pop(k, "auto") for k in KDX_KEYS}
        super().__init__(**kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import configure_log, filter_overrides, setup_globals
        from hydra_plugins.hydra_joblib_launcher._core import execute_job
        from joblib import Parallel, delayed

        from kdx.launcher import ParallelJob, plan_cores

        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        options = {k: v for k, v in self.joblib.items() if v is not None}
        plan = plan_cores(options.pop("n_jobs", 2), len(job_overrides), **self.kdx_settings)
        options.update(backend="loky", n_jobs=plan.parallel)  # loky: Hydra's state does not survive threads
        print(f"[kdx] parallel launcher: {plan.describe()}", flush=True)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        task = ParallelJob(self.task_function, plan)
        state = Singleton.get_state()
        runs = Parallel(**options)(
            delayed(execute_job)(initial_job_idx + idx, overrides, self.hydra_context, self.config, task, state)
            for idx, overrides in enumerate(job_overrides))
        return list(runs)
