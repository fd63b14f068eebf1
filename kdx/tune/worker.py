"""One worker process of a parallel kdx-tune study (`tune.jobs=N`): `python -m kdx.tune.worker SPEC K PARENT_PID`.

kdx-tune writes SPEC (the study folder's workers.json: storage, settings, overrides, threads) and starts N of
these; each takes trials from the shared storage until the study holds tune.trials finished ones. A worker dies
with its parent (Linux: PR_SET_PDEATHSIG), so `kill -9` of kdx-tune leaves no trial running unseen: its trials
stay RUNNING in the storage and the next invocation marks them failed.
Exit codes: 0 done, 2 a kdx error (one sentence on stderr), 130 Ctrl-C.
"""
from __future__ import annotations

import json
import os
import signal
import sys


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the worker outlives a killed parent
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3:
        print("usage: python -m kdx.tune.worker SPEC WORKER PARENT_PID (started by kdx-tune)", file=sys.stderr)
        return 2
    spec, worker, parent = argv[0], int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    with open(spec) as f:
        data = json.load(f)

    import torch

    from kdx.errors import KdxError, RunInterrupted
    from kdx.tune.study import Plan, worker_loop

    if data.get("threads"):
        torch.set_num_threads(int(data["threads"]))
    try:
        worker_loop(Plan(**data), worker)
    except RunInterrupted:
        return 130
    except KeyboardInterrupt:
        return 130
    except KdxError as e:
        print(f"kdx-tune: worker {worker}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
