"""Keep the console for what kdx has to say: library tips, notices and known-harmless warnings are left out.

Left out of the console (Hydra's log file in the run folder still has the log records):
- Lightning's info lines (GPU/TPU available, tips, "Trainer.fit stopped", "Restoring states ...");
- warnings that are expected in kdx's set-up, listed in `HARMLESS_WARNINGS` with the reason for each;
- the plugin and study notices of alembic and Optuna in sweeps.
`KDX_VERBOSE=1` shows all of it again.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

# message patterns (regular expressions matched at the start of the message) of warnings that say nothing
# actionable to a kdx user, each with the reason it is harmless here
HARMLESS_WARNINGS = (
    (r".*exists and is not empty", "the run folder holds results.json and config.yaml by design"),
    (r".*smaller than the logging interval", "short runs log fewer steps; every epoch is still logged"),
    (r".*isinstance\(treespec, LeafSpec\)", "a deprecation inside Lightning, not in kdx or the user's code"),
    (r".*You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a "
     r"`LightningDataModule`", "kdx's modules move batches to the device on purpose"),
    (r".*does not have many workers", "data.num_workers is chosen per data set and machine"),
    (r".*This DataLoader will create \d+ worker processes in total", "loader workers mostly wait on a queue; "
     "the parallel launcher divides the cores itself"),
    (r".*'pin_memory' argument is set as true but no accelerator is found", "pinning is a no-op on the CPU"),
    (r".*Consider setting `persistent_workers=True`", "kdx sets persistent_workers where it helps"),
    (r".*Found \d+ module\(s\) in eval mode at the start of training", "frozen teachers (probe, distillation) "
     "stay in eval mode by design"),
)
NOISY_LOGGERS = ("pytorch_lightning", "lightning", "lightning_fabric", "alembic")  # info below WARNING is dropped
VERBOSE_ENV = "KDX_VERBOSE"


def verbose() -> bool:
    """True when the user asked for every library message (`KDX_VERBOSE=1`)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class ConsoleNoiseFilter(logging.Filter):
    """Drops records below WARNING from the libraries in NOISY_LOGGERS (on console handlers only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(NOISY_LOGGERS)


def _console_handlers() -> list[logging.Handler]:
    """Stream handlers writing to a console, of the root logger and of Lightning's own loggers."""
    handlers = []
    for name in ("", "pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handlers.append(handler)
    return handlers


def share_library_logs() -> None:
    """Send Lightning's log records to the root logger's handlers (Hydra's console and its log file in the run
    folder), as when Lightning is imported after Hydra configured logging.

    Imported before that (kdx's modules import it at start-up), Lightning gives its loggers a console handler
    of their own and stops them propagating to the root, so its records would miss the run's log file."""
    if not logging.getLogger().hasHandlers():
        return
    for name in ("pytorch_lightning", "lightning_fabric"):
        logger = logging.getLogger(name)
        if logger.propagate:
            continue
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the one added when the library was imported
                logger.removeHandler(handler)
        logger.propagate = True


def quiet_library_output(sweeper: str | None = None) -> None:
    """Apply the filters above to the warnings module and the console log handlers (idempotent)."""
    if verbose():
        return
    for pattern, _reason in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for handler in _console_handlers():
        if not any(isinstance(f, ConsoleNoiseFilter) for f in handler.filters):
            handler.addFilter(ConsoleNoiseFilter())
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "setup plugin ..." when Optuna imports it
    if "optuna" in sys.modules or (sweeper and "optuna" in sweeper.lower()):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory ..."


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra < 1.1
    _HydraCallback = object  # type: ignore[assignment,misc]


class QuietOutput(_HydraCallback):
    """Hydra callback (conf/train.yaml): quiets library output in the launching process and in every job."""

    @staticmethod
    def _sweeper(config: Any) -> str | None:
        try:
            return str(config.hydra.sweeper.get("_target_"))
        except Exception:  # no hydra section (tests, API)
            return None

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        quiet_library_output()

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        quiet_library_output(self._sweeper(config))

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        share_library_logs()  # Hydra has just configured logging (again for each job, in each worker process)
        quiet_library_output()
