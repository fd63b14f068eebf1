"""What a run prints while it trains: progress (a bar on a terminal, lines with an ETA in logs) and epoch summaries.

`trainer.progress_bar`:
- `auto`: the rich bar on a terminal, else `log` (CI, nohup, SLURM, a pipe);
- `rich` / `tqdm`: those bars, epochs counted from 1 like everything else kdx prints;
- `log`: a line every `trainer.progress_every` training steps (`auto`: every 30 s) with loss, images/s and the
  ETA of the epoch and of the run;
- `none`: only the line per epoch.
Every mode prints one line per validated epoch with its metrics and the ETA of the run.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from kdx.errors import ConfigError

PROGRESS_MODES = ("auto", "rich", "tqdm", "log", "none")
AUTO_INTERVAL_S = 30.0  # progress_every=auto: seconds between two progress lines
JOB_LABEL_ENV = "KDX_JOB_LABEL"  # set by the parallel launcher (kdx.launcher): lines of side-by-side jobs say whose


def line_prefix() -> str:
    """`[job 3] ` while this process runs a job of a parallel sweep (jobs print side by side), else ``."""
    label = os.environ.get(JOB_LABEL_ENV)
    return f"[{label}] " if label else ""


def format_duration(seconds: float | None) -> str:
    """A short human duration: 45s, 3m05s, 2h04m; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _batch_size(batch: Any) -> int | None:
    """Number of samples in a batch: the first dimension of its first tensor."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size is not None:
                return size
    return None


def _max_epochs(trainer: pl.Trainer) -> int | None:
    """The epoch count the run stops at, None when it is bounded by steps or time only."""
    value = trainer.max_epochs
    return int(value) if value is not None and value > 0 else None


def _train_batches(trainer: pl.Trainer) -> int | None:
    """Training steps per epoch, None when unknown (iterable datasets)."""
    total = trainer.num_training_batches
    return int(total) if total is not None and math.isfinite(total) and total > 0 else None


class RunClock(Callback):
    """Measures epoch times of this fit and estimates how long the rest of the run takes."""

    def __init__(self) -> None:
        self.fit_start = time.monotonic()
        self.epoch_start = self.fit_start
        self.first_epoch = 0
        self.epoch_times: list[float] = []
        self.train_times: list[float] = []  # the training loop alone: epoch start to its last step's end
        self.last_step_end = self.fit_start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.monotonic()
        self.first_epoch = int(trainer.current_epoch)  # > 0 when resumed
        self.epoch_times = []
        self.train_times = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_start = self.last_step_end = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.last_step_end = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs validation before this hook, so this is the epoch's training plus validation time
        self.epoch_times.append(time.monotonic() - self.epoch_start)
        self.train_times.append(self.last_step_end - self.epoch_start)

    def epoch_estimate(self, step_time: float | None, trainer: pl.Trainer) -> float | None:
        """Seconds of one whole epoch: the mean of finished epochs, else steps x the current step time."""
        if self.epoch_times:
            return sum(self.epoch_times) / len(self.epoch_times)
        steps = _train_batches(trainer)
        return steps * step_time if steps and step_time else None

    def remaining(self, trainer: pl.Trainer, step_time: float | None = None, steps_done: int | None = None) -> float | None:
        """Seconds left in the run: the current epoch's remaining steps plus the epochs after it."""
        max_epochs = _max_epochs(trainer)
        estimate = self.epoch_estimate(step_time, trainer)
        if max_epochs is None or estimate is None:
            return None
        if steps_done is None:  # between epochs: current_epoch counts the epochs already finished
            return max(0, max_epochs - int(trainer.current_epoch)) * estimate
        steps = _train_batches(trainer)
        left_in_epoch = (steps - steps_done) * step_time if steps and step_time else 0.0
        return left_in_epoch + max(0, max_epochs - int(trainer.current_epoch) - 1) * estimate


class EpochSummary(Callback):
    """Prints one line per validated epoch: epoch (counted from 1), its time, the logged metrics and the run's ETA.

    Lightning validates before the training epoch ends, and only then reduces the epoch's training loss, so the
    line is printed at the end of the training epoch with the validation metrics kept from its validation: the
    loss shown is this epoch's, not the previous one's.
    """

    def __init__(self, clock: RunClock) -> None:
        self.clock = clock
        self._validated: tuple[int, dict[str, float], float, int] | None = None  # epoch, val metrics, time, done

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self._validated = (int(trainer.current_epoch), shown, time.monotonic() - self.clock.epoch_start,
                           len(self.clock.epoch_times))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._validated is None or self._validated[0] != int(trainer.current_epoch):
            return
        _, shown, elapsed, done_before = self._validated
        self._validated = None
        loss = trainer.callback_metrics.get("train/loss_epoch")
        if loss is not None:
            shown = {**shown, "train/loss_epoch": float(loss)}
        text = "  ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
        max_epochs = _max_epochs(trainer)
        epoch = int(trainer.current_epoch) + 1
        line = f"epoch {epoch}/{max_epochs or '?'}  {elapsed:.1f}s  {text}"
        if max_epochs and epoch < max_epochs:
            mean = (sum(self.clock.epoch_times[:done_before]) + elapsed) / (done_before + 1)
            line += f"  ETA {format_duration((max_epochs - epoch) * mean)}"
        print(line_prefix() + line, flush=True)


class StepProgress(Callback):
    """Progress lines for logs (no terminal): every `every` steps, or every `interval_s` seconds when `every` is None."""

    def __init__(self, clock: RunClock, every: int | None = None, interval_s: float = AUTO_INTERVAL_S,
                 stream=None) -> None:
        self.clock = clock
        self.every = every
        self.interval_s = interval_s
        self.stream = stream
        self._last_time = 0.0
        self._last_step = 0
        self._samples = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time = time.monotonic()
        self._last_step = 0
        self._samples = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += _batch_size(batch) or 0
        step = batch_idx + 1
        now = time.monotonic()
        if self.every is not None:
            due = step % self.every == 0
        else:
            due = now - self._last_time >= self.interval_s
        if not due or not trainer.is_global_zero:
            return
        step_time = (now - self.clock.epoch_start) / step
        rate = self._samples / max(now - self._last_time, 1e-9)
        total = _train_batches(trainer)
        max_epochs = _max_epochs(trainer)
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
        parts = [f"epoch {int(trainer.current_epoch) + 1}/{max_epochs or '?'}",
                 f"step {step}/{total or '?'}" + (f" ({100 * step // total}%)" if total else "")]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{rate:,.0f} img/s")
        eta = [f"epoch {format_duration((total - step) * step_time)}"] if total else []
        left = self.clock.remaining(trainer, step_time, step)
        if left is not None and max_epochs and max_epochs > 1:
            eta.append(f"run {format_duration(left)}")
        if eta:
            parts.append("ETA " + ", ".join(eta))
        print(line_prefix() + "  ".join(parts), file=self.stream or sys.stdout, flush=True)
        self._last_time, self._last_step, self._samples = now, step, 0


def _compact_metrics(items: dict[str, Any]) -> dict[str, Any]:
    """The progress bar's metrics, short: the step loss as `loss`, no epoch loss or version number."""
    out = {}
    for key, value in items.items():
        if key in ("v_num", "train/loss_epoch"):
            continue
        out["loss" if key in ("train/loss_step", "train/loss") else key] = value
    return out


def _rich_bar():
    from pytorch_lightning.callbacks import RichProgressBar

    class KdxRichProgressBar(RichProgressBar):
        """Lightning's rich bar, with epochs counted from 1 (as kdx's lines do) and fewer metrics."""

        def _get_train_description(self, current_epoch: int) -> str:
            text = f"epoch {current_epoch + 1}" + (f"/{self.trainer.max_epochs}" if _max_epochs(self.trainer) else "")
            return f"{text:{len(self.validation_description)}}"

        def get_metrics(self, trainer, pl_module):
            return _compact_metrics(super().get_metrics(trainer, pl_module))

    return KdxRichProgressBar(leave=True)


def _tqdm_bar():
    from pytorch_lightning.callbacks import TQDMProgressBar

    class KdxTQDMProgressBar(TQDMProgressBar):
        """Lightning's tqdm bar, with epochs counted from 1 and fewer metrics."""

        def on_train_epoch_start(self, trainer, *args) -> None:
            super().on_train_epoch_start(trainer, *args)
            max_epochs = _max_epochs(trainer)
            self.train_progress_bar.set_description(
                f"epoch {trainer.current_epoch + 1}" + (f"/{max_epochs}" if max_epochs else ""))

        def get_metrics(self, trainer, pl_module):
            return _compact_metrics(super().get_metrics(trainer, pl_module))

    return KdxTQDMProgressBar()


def parse_every(value: Any) -> int | None:
    """`trainer.progress_every`: None for auto (time-based), else a whole number of steps >= 1."""
    if value is None or str(value).lower() == "auto":
        return None
    try:
        every = int(value)
    except (TypeError, ValueError):
        every = 0
    if every < 1 or str(value).strip() != str(every):
        raise ConfigError(f"trainer.progress_every must be auto or a whole number of steps >= 1, got {value!r}")
    return every


def resolve_mode(progress: Any) -> str:
    """The progress mode to use: `auto` becomes rich on a terminal (not in CI), else log."""
    mode = str(progress).lower() if progress not in (None, False) else "none"
    if mode not in PROGRESS_MODES:
        raise ConfigError(f"trainer.progress_bar must be {', '.join(PROGRESS_MODES)}, got {progress!r}")
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() and not os.environ.get("CI") else "log"
    return mode


def progress_callbacks(progress: Any = "auto", every: Any = "auto") -> tuple[list[Callback], bool]:
    """(callbacks, enable_progress_bar) for `trainer.progress_bar` and `trainer.progress_every`."""
    mode = resolve_mode(progress)
    steps = parse_every(every)
    clock = RunClock()
    callbacks: list[Callback] = [clock, EpochSummary(clock)]
    if mode == "rich":
        callbacks.append(_rich_bar())
    elif mode == "tqdm":
        callbacks.append(_tqdm_bar())
    elif mode == "log":
        callbacks.append(StepProgress(clock, every=steps))
    return callbacks, mode in ("rich", "tqdm")
