"""The callback that feeds a trial's validation curve to Optuna and stops the trial when the pruner says so.

kdx.train builds each run's Trainer itself (kdx.train.trainer.build_trainer). Lightning adds the callbacks of
every `pytorch_lightning.callbacks_factory` entry point to each Trainer it creates; kdx registers
`trial_callbacks` there (pyproject.toml), which hands out the reporter of the trial this process is running
(`reporting(...)`) to the first Trainer built while it is active, and nothing otherwise. So a trial is an
ordinary kdx-train run, and a Trainer outside kdx-tune gets no callback at all.

This module is imported by every Trainer: it imports nothing heavy (no Optuna; pytorch_lightning is loaded
by then).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

from pytorch_lightning.callbacks import Callback

from kdx.errors import ConfigError

ENTRY_POINT_GROUP = "pytorch_lightning.callbacks_factory"
ENTRY_POINT_VALUE = "kdx.tune.callback:trial_callbacks"


class TrialReporter(Callback):
    """After each epoch's validation: report `metric` to the Optuna trial (step = the epoch, counted from 1, so
    that a pruner's warm-up or minimum resource of N steps is N epochs) and, when the
    trial's pruner gives up on it, ask the Trainer to stop after this epoch (the run then ends as usual: its best
    checkpoint is tested and results.json written, so a pruned trial's folder is a whole, shorter run)."""

    def __init__(self, trial: Any, metric: str, maximize: bool) -> None:
        self.trial = trial
        self.metric = metric
        self.maximize = maximize
        self.values: list[tuple[int, float]] = []  # (epoch, value) of each validation after training started
        self.pruned_at: int | None = None          # the epoch after which the pruner stopped the trial

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.metric not in metrics:
            logged = ", ".join(sorted(k for k in metrics if k.startswith("val/"))) or "none"
            raise ConfigError(f"tune.metric {self.metric} is not logged by this run (its validation metrics: {logged}); "
                              f"set tune.metric to one of them")
        value = float(metrics[self.metric])
        epoch = int(trainer.current_epoch)
        self.values.append((epoch, value))
        if not math.isfinite(value):  # kdx.train's FiniteGuard stops the run when this is checkpoint.monitor
            return
        self.trial.report(value, step=epoch + 1)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = epoch
            trainer.should_stop = True

    @property
    def epochs(self) -> int:
        """Epochs whose validation was reported."""
        return len({epoch for epoch, _ in self.values})

    def best(self) -> float | None:
        """The best finite value over the reported epochs (the trial's value), or None when there is none."""
        finite = [v for _, v in self.values if math.isfinite(v)]
        if not finite:
            return None
        return max(finite) if self.maximize else min(finite)


_ACTIVE: list[TrialReporter] = []  # the reporter of the trial this process runs, until a Trainer has taken it


def trial_callbacks() -> list[Callback]:
    """The `pytorch_lightning.callbacks_factory` entry point: the active trial's reporter, once; else nothing."""
    taken = list(_ACTIVE)
    _ACTIVE.clear()
    return taken


@contextmanager
def reporting(reporter: TrialReporter) -> Iterator[TrialReporter]:
    """Hand `reporter` to the next Trainer this process builds (the trial's run), within the block."""
    _ACTIVE[:] = [reporter]
    try:
        yield reporter
    finally:
        _ACTIVE.clear()


def entry_point_installed() -> bool:
    """True when Lightning will find trial_callbacks (kdx installed with its entry points)."""
    from importlib.metadata import entry_points

    return any(ep.value.replace(" ", "") == ENTRY_POINT_VALUE for ep in entry_points(group=ENTRY_POINT_GROUP))
