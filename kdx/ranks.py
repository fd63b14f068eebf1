"""Which process is this: rank helpers for code that must run (or write) once per job."""
from __future__ import annotations

import os


def is_rank_zero() -> bool:
    """True on Lightning's rank 0 (or outside distributed training)."""
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def is_global_zero_process() -> bool:
    """True in the process that owns the run folder (rank 0 of node 0), judged from the launch environment."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(key, "0") not in ("0", ""):
            return False
    return is_rank_zero()
