"""Which process is this: rank helpers for code that must run (or write) once per job.

A job that a cluster launcher started (torchrun, or srun on SLURM) has one process per rank from the start;
`cluster_launch()` says which launcher, judged from the environment in the order Lightning uses (torchrun
first: it may run inside a SLURM allocation). `launch_rank()` is the global rank that launcher gave this
process, and `launch_stamp()` the name every process of the job agrees on for a new run folder (the launch's
job id, where a timestamp would differ from one process to the next).
"""
from __future__ import annotations

import os
import re

from kdx.errors import ConfigError


def _int_env(key: str, default: int) -> int:
    try:
        return int(os.environ.get(key, default))
    except ValueError:
        return default


def cluster_launch() -> str | None:
    """'torchrun' or 'slurm' when that launcher started this job as several processes, else None.

    SLURM counts when srun started the tasks the way Lightning reads them (SLURM_NTASKS > 1, a SLURM_PROCID,
    and not an interactive allocation, whose job name is 'bash' or 'interactive': there Lightning ignores SLURM).
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun" if _int_env("WORLD_SIZE", 1) > 1 else None
    if ("SLURM_PROCID" in os.environ and _int_env("SLURM_NTASKS", 1) > 1
            and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")):
        return "slurm"
    return None


def cluster_world_size() -> int:
    """Processes the cluster launcher started for this job (1 outside a cluster launch)."""
    kind = cluster_launch()
    if kind == "torchrun":
        return _int_env("WORLD_SIZE", 1)
    if kind == "slurm":
        return _int_env("SLURM_NTASKS", 1)
    return 1


def launch_rank() -> int:
    """The global rank the launcher gave this process (torchrun's RANK, SLURM's SLURM_PROCID); 0 elsewhere."""
    kind = cluster_launch()
    if kind == "torchrun":
        return _int_env("RANK", 0)
    if kind == "slurm":
        return _int_env("SLURM_PROCID", 0)
    return 0


def launch_stamp(stamp: str) -> str:
    """The name of a new run (or sweep) folder: `stamp` (a timestamp), or in a cluster launch the job's id,
    which every process of the job reads alike: `torchrun-<rdzv id>` or `slurm-<job id>[.<step id>]`.

    torchrun's rendezvous id is 'none' unless --rdzv-id is given (or --standalone picks one); its processes
    then have nothing in common to name a folder by, which is one ConfigError saying what to pass.
    """
    kind = cluster_launch()
    if kind == "torchrun":
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id in ("", "none"):
            raise ConfigError("torchrun started this job on several processes without --rdzv-id, so they cannot "
                              "agree on a new run folder (each would take its own timestamp); pass --rdzv-id=NAME "
                              "to torchrun (the run goes to .../torchrun-NAME) or the same hydra.run.dir=FOLDER "
                              "(hydra.sweep.dir= for -m) on every node")
        return "torchrun-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    if kind == "slurm":
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
        if not job:
            raise ConfigError("SLURM started this job on several tasks but SLURM_JOB_ID is not set, so they cannot "
                              "agree on a new run folder; give the same hydra.run.dir=FOLDER (hydra.sweep.dir= for "
                              "-m) to every task")
        step = os.environ.get("SLURM_STEP_ID") or os.environ.get("SLURM_STEPID")
        return f"slurm-{job}" + (f".{step}" if step not in (None, "", "0") else "")
    return str(stamp)


def is_rank_zero() -> bool:
    """True on Lightning's rank 0 (or outside distributed training)."""
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def is_global_zero_process() -> bool:
    """True in the process that owns the run folder (rank 0 of node 0), judged from the launch environment."""
    if cluster_launch() is not None:
        return launch_rank() == 0 and is_rank_zero()
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(key, "0") not in ("0", ""):
            return False
    return is_rank_zero()
