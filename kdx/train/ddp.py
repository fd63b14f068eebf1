"""DDP inside a sweep or a pipeline: a multi-process job runs in a fresh process tree of its own.

Lightning's `ddp` strategy starts ranks > 0 by re-running the command line; in a Hydra multirun that would
re-run the whole sweep. `run_ddp_worker` therefore starts `python -m kdx.train.ddp_worker RUN_DIR`, which
trains the config saved in RUN_DIR/config.yaml, and Lightning re-runs that worker for the other ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kdx.runs import RESUME_CKPT_ENV

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
    """Train the config saved in `run_dir` in a fresh process (`python -m kdx.train.ddp_worker RUN_DIR`);
    its exit code."""
    env = dict(os.environ)
    env[RESUME_CKPT_ENV] = str(resume_ckpt) if resume_ckpt else ""
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(key, None)
    return subprocess.call([sys.executable, "-m", "kdx.train.ddp_worker", str(run_dir)], env=env)
