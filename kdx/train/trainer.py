"""The Lightning Trainer of a run: checkpoints, loggers and progress output from the `trainer`/`logger` configs."""
from __future__ import annotations

import csv
import io
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins.io import TorchCheckpointIO

from kdx.checkpoints import check_finite_weights, plain_checkpoint, read_checkpoint
from kdx.errors import ConfigError, NonFiniteError
from kdx.io import atomic_path, atomic_write_text
from kdx.progress import progress_callbacks
from kdx.quiet import quiet_library_output
from kdx.train.wandb_logging import build_wandb_logger

# keys of the `trainer` config that kdx handles itself instead of passing to pl.Trainer
KDX_TRAINER_KEYS = ("progress_bar", "progress_every", "channels_last", "compile")
# seconds a checkpoint save waits between writing its temporary file and renaming it (fault-injection tests only)
FAULT_PAUSE_ENV = "KDX_FAULT_PAUSE_IN_SAVE"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that are safe to write and to read.

    Writing: the metadata is made plain (kdx.checkpoints.plain_checkpoint), the weights are checked to be
    finite (a NaN model is never written over a good one), and the file goes to a temporary name in the same
    folder that is renamed into place, so a crash or a kill while saving leaves the previous checkpoint intact.
    The bytes are written here, not by Lightning's fsspec transaction, which stages every checkpoint in the
    system temp folder (a small /tmp failed the save under a path the user never chose); a full disk is one
    DiskFullError naming the checkpoint folder.
    Reading (resume, test from best.ckpt): weights_only=True, so a checkpoint cannot run code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("kdx checkpoints take no storage_options")
        plain_checkpoint(checkpoint)
        check_finite_weights(checkpoint.get("state_dict") or {},
                             f" at epoch {int(checkpoint.get('epoch', 0)) + 1}, step {checkpoint.get('global_step')}")
        buffer = io.BytesIO()  # serialised first: torch's own file writer turns ENOSPC into a RuntimeError
        torch.save(checkpoint, buffer)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
            pause = os.environ.get(FAULT_PAUSE_ENV)
            if pause:  # fault injection (scripts/faults.py): a kill in this window hits a half-done save
                time.sleep(float(pause))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path)


class LastCheckpoint(ModelCheckpoint):
    """Writes `checkpoints/last.ckpt` at the end of every epoch, whether or not the monitored metric improved.

    (Lightning's own `save_last` rewrites last.ckpt only in the epochs where a top-k checkpoint is saved, so a
    killed run resumed from a stale epoch.) It saves at the same point of the epoch as ModelCheckpoint does
    (after validation, else at the end of the training epoch): the point a run resumes from exactly.
    """

    def __init__(self, dirpath: str | Path) -> None:
        super().__init__(dirpath=str(dirpath), filename="last", monitor=None, save_top_k=1, save_last=False,
                         enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return "kdx.LastCheckpoint"


class RandomState(Callback):
    """Saves the random generators (python, numpy, torch CPU and CUDA) in every checkpoint, and restores them
    when a run resumes, so a resumed run draws the same shuffles, augmentations and dropout masks as an
    uninterrupted one.

    Samplers are covered through these: kdx's loaders shuffle with torch's generator (RandomSampler), or
    with a seed and the epoch (DistributedSampler, ViewSampler). Loader workers are seeded from torch's
    generator each epoch, unless they are persistent (data.persistent_workers=true keeps their streams
    across epochs, which a resumed run cannot rebuild).
    """

    @property
    def state_key(self) -> str:
        return "kdx.RandomState"

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                           "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at once: what follows in Trainer.fit before the first training batch (optimizer set-up,
        # the sanity check, which Lightning runs under isolate_rng) draws nothing from these generators.
        if "python" in state_dict:
            version, internal, gauss = state_dict["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in state_dict:
            n = state_dict["numpy"]
            np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                 n["cached_gaussian"]))
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class InterruptState:
    """Ctrl-C bookkeeping shared by kdx.train.interrupts' SIGINT handler and the InterruptCheck callback."""

    requested = 0  # SIGINTs received during the current run
    cooperative = False  # True while a Trainer runs: the first Ctrl-C is acted on at the next batch boundary


class InterruptCheck(Callback):
    """Acts on Ctrl-C at the next batch boundary of fit, validation or test.

    The SIGINT handler of a run only notes the first Ctrl-C while a Trainer runs, and this callback raises
    KeyboardInterrupt (which Lightning shuts down on) at the next batch end. Raised from the signal handler
    itself, it could land inside a finalizer or a lock release, where Python prints it and drops it, and the
    run would go on. A second Ctrl-C interrupts at once.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        InterruptState.cooperative = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        InterruptState.cooperative = False

    @staticmethod
    def _check() -> None:
        if InterruptState.requested:
            raise KeyboardInterrupt

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._check()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._check()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._check()

    def on_train_epoch_start(self, *args: Any, **kwargs: Any) -> None:
        self._check()


class FiniteGuard(Callback):
    """Stops a run whose monitored metric becomes NaN or infinite, before any checkpoint of that epoch is
    written (Lightning runs checkpoint callbacks after the others). Loss terms are checked as they are
    computed (kdx.lit.loss_logging); checks deferred on accelerators are settled here at each epoch end."""

    def __init__(self, monitor: str | None) -> None:
        self.monitor = monitor

    @staticmethod
    def _settle(pl_module: pl.LightningModule) -> None:
        settle = getattr(pl_module, "settle_finite_checks", None)
        if callable(settle):
            settle()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._settle(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._settle(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._settle(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.monitor or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not math.isfinite(value):
            raise NonFiniteError(f"the monitored metric {self.monitor} is {value} after epoch {trainer.current_epoch + 1} "
                                 f"(step {trainer.global_step}); the run stops "
                                 f"here and keeps the checkpoints written before; lower optim.lr or check the data and the loss")


class AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but metrics.csv and hparams.yaml are rewritten atomically and an existing
    metrics.csv is kept (Lightning's deletes it on start and rewrites it in place when a new column appears:
    a kill at that moment lost every row)."""

    def _check_log_dir_exists(self) -> None:  # keep an existing metrics.csv (a resumed run appends to it)
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with atomic_path(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        rows: list[dict[str, Any]] = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                rows = list(csv.DictReader(f))
        self._record_new_keys()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerows(self.metrics)
        atomic_write_text(self.metrics_file_path, buffer.getvalue())
        self.metrics = []


class AtomicCSVLogger(CSVLogger):
    """A CSVLogger writing through AtomicExperimentWriter, whose rows reach the disk with every checkpoint."""

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        # rows logged up to a checkpoint reach the disk with it: a killed run loses none it resumes past
        super().after_save_checkpoint(checkpoint_callback)
        if self._experiment is not None:
            self.save()

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def _csv_logger(options: dict[str, Any], run_dir: Path, cfg: DictConfig):
    return AtomicCSVLogger(save_dir=str(run_dir), name="", version="", **options)


def _tensorboard_logger(options: dict[str, Any], run_dir: Path, cfg: DictConfig):
    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", **options)


# `logger=` options: name -> builder(options, run_dir, cfg)
LOGGERS = {"csv": _csv_logger, "tensorboard": _tensorboard_logger, "wandb": build_wandb_logger}


def build_loggers(logger_cfg: dict[str, Any] | None, run_dir: Path, cfg: DictConfig) -> list:
    """Loggers named in the `logger` config (csv, tensorboard, wandb; several at once is fine)."""
    loggers = []
    for name, options in (logger_cfg or {}).items():
        if name not in LOGGERS:
            raise ConfigError(f"logger {name!r} is unknown; use logger=csv, tensorboard or wandb (or a list of them)")
        try:
            loggers.append(LOGGERS[name](dict(options or {}), run_dir, cfg))
        except TypeError as e:  # an option the logger does not take, e.g. +logger.csv.flush_every=10
            raise ConfigError(f"logger.{name} has an option the {name} logger does not take ({e}); see the "
                              f"logger's arguments or drop it") from None
    if "csv" not in (logger_cfg or {}):  # metrics.csv is what results.json, kdx-report and the pipeline read
        loggers.append(LOGGERS["csv"]({}, run_dir, cfg))
    return loggers


def _uses_gpu(accelerator: Any) -> bool:
    """True when `trainer.accelerator` runs on CUDA GPUs ('auto' picks them when present)."""
    name = str(accelerator or "auto").lower()
    return name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())


def build_trainer(cfg: DictConfig, run_dir: Path) -> tuple[pl.Trainer, ModelCheckpoint | None]:
    """A pl.Trainer writing into `run_dir`, and its best-checkpoint callback (None when checkpointing is off)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    progress, shows_bar = progress_callbacks(trainer_cfg.get("progress_bar", "auto"),
                                             trainer_cfg.get("progress_every", "auto"))
    for key in KDX_TRAINER_KEYS:
        trainer_cfg.pop(key, None)
    ck = cfg.get("checkpoint") or {}
    callbacks: list[Callback] = [*progress, FiniteGuard(ck.get("monitor")), RandomState(), InterruptCheck(),
                                 LearningRateMonitor(logging_interval="step")]  # lr-<optimizer> in every logger
    ckpt_cb = None
    if trainer_cfg.get("enable_checkpointing", True):
        ckpt_cb = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="best", monitor=ck.get("monitor"),
                                  mode=ck.get("mode", "max"), save_last=False,
                                  save_top_k=int(ck.get("save_top_k", 1)), auto_insert_metric_name=False)
        callbacks.append(ckpt_cb)
        if bool(ck.get("save_last", True)):
            callbacks.append(LastCheckpoint(run_dir / "checkpoints"))
    trainer_cfg["enable_progress_bar"] = shows_bar
    if str(trainer_cfg.get("accelerator", "auto")).lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu (trainer=gpu) needs a CUDA GPU and torch sees none on this machine; "
                          "use trainer=cpu, or trainer.accelerator=auto to take a GPU only where there is one")
    if trainer_cfg.get("sync_batchnorm") and not _uses_gpu(trainer_cfg.get("accelerator", "auto")):
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU version); "
                          "drop it for CPU runs")
    loggers = build_loggers(OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None, run_dir, cfg)
    trainer_cfg.setdefault("enable_model_summary", False)
    plugins = trainer_cfg.pop("plugins", None) or []
    quiet_library_output()  # library tips and known-harmless warnings off the console (KDX_VERBOSE=1 keeps them)
    try:
        trainer = pl.Trainer(default_root_dir=str(run_dir), logger=loggers or False, callbacks=callbacks,
                             plugins=[AtomicCheckpointIO(), *plugins], **trainer_cfg)
    except TypeError as e:
        raise ConfigError(f"the trainer config has a key pl.Trainer does not accept: {e}") from e
    return trainer, ckpt_cb
