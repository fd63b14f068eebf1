"""`python -m kdx.train.ddp_worker RUN_DIR`: train the config saved in RUN_DIR in a fresh process.

kdx.train.ddp.run_ddp_worker starts it when a multi-GPU job is part of a sweep or a pipeline, so that the
DDP ranks are forked from a clean process.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from kdx.errors import KdxError
from kdx.io import read_results
from kdx.train.run import run_training


def main(argv: list[str]) -> int:
    run_dir = Path(argv[0]).resolve()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    previous = read_results(run_dir) or {}
    try:
        run_training(cfg, run_dir, previous.get("overrides") or [], _worker=True)
    except KdxError as e:
        print(f"kdx: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
