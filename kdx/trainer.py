"""The Lightning Trainer of a run: checkpoints, loggers and progress output from the `trainer`/`logger` configs."""
from __future__ import annotations

import os
import warnings
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from kdx.errors import ConfigError

# keys of the `trainer` config that kdx handles itself instead of passing to pl.Trainer
KDX_TRAINER_KEYS = ("progress_bar", "channels_last", "compile")


class EpochSummary(Callback):
    """Prints one line per validation epoch: epoch, time and the logged metrics (readable in CI logs)."""

    def __init__(self) -> None:
        self._t0 = time.time()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.time()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val/") or k == "train/loss_epoch"}
        text = "  ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {time.time() - self._t0:.1f}s  {text}",
              flush=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder and renames it into place, so a crash
    while saving leaves the previous checkpoint intact, never only a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def build_loggers(logger_cfg: dict[str, Any] | None, run_dir: Path, cfg: DictConfig) -> list:
    """Loggers named in the `logger` config (csv, tensorboard, wandb; several at once is fine)."""
    loggers = []
    for name, options in (logger_cfg or {}).items():
        options = dict(options or {})
        if name == "csv":
            from pytorch_lightning.loggers import CSVLogger

            loggers.append(CSVLogger(save_dir=str(run_dir), name="", version="", **options))
        elif name == "tensorboard":
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", **options))
        elif name == "wandb":
            from kdx.logging_wandb import build_wandb_logger

            loggers.append(build_wandb_logger(options, run_dir, cfg))
        else:
            raise ConfigError(f"logger {name!r} is unknown; use logger=csv, tensorboard or wandb (or a list of them)")
    return loggers


def _uses_gpu(accelerator: Any) -> bool:
    """True when `trainer.accelerator` runs on CUDA GPUs ('auto' picks them when present)."""
    import torch

    name = str(accelerator or "auto").lower()
    return name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())


def build_trainer(cfg: DictConfig, run_dir: Path) -> tuple[pl.Trainer, ModelCheckpoint | None]:
    """A pl.Trainer writing into `run_dir`, and its best-checkpoint callback (None when checkpointing is off)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    progress = trainer_cfg.pop("progress_bar", "auto")
    for key in KDX_TRAINER_KEYS:
        trainer_cfg.pop(key, None)
    callbacks: list[Callback] = [EpochSummary()]
    ckpt_cb = None
    ck = cfg.get("checkpoint") or {}
    if trainer_cfg.get("enable_checkpointing", True):
        ckpt_cb = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="best", monitor=ck.get("monitor"),
                                  mode=ck.get("mode", "max"), save_last=bool(ck.get("save_last", True)),
                                  save_top_k=int(ck.get("save_top_k", 1)), auto_insert_metric_name=False)
        callbacks.append(ckpt_cb)
    if progress == "auto":
        progress = "rich" if sys.stdout.isatty() and not os.environ.get("CI") else "none"
    if progress == "rich":
        from pytorch_lightning.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
        trainer_cfg["enable_progress_bar"] = True
    elif progress == "tqdm":
        trainer_cfg["enable_progress_bar"] = True
    elif progress == "none":
        trainer_cfg["enable_progress_bar"] = False
    else:
        raise ConfigError(f"trainer.progress_bar must be auto, rich, tqdm or none, got {progress!r}")
    if trainer_cfg.get("sync_batchnorm") and not _uses_gpu(trainer_cfg.get("accelerator", "auto")):
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU version); "
                          "drop it for CPU runs")
    loggers = build_loggers(OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None, run_dir, cfg)
    trainer_cfg.setdefault("enable_model_summary", False)
    plugins = trainer_cfg.pop("plugins", None) or []
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # run_dir holds results.json by design
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    try:
        trainer = pl.Trainer(default_root_dir=str(run_dir), logger=loggers or False, callbacks=callbacks,
                             plugins=[AtomicCheckpointIO(), *plugins], **trainer_cfg)
    except TypeError as e:
        raise ConfigError(f"the trainer config has a key pl.Trainer does not accept: {e}") from e
    return trainer, ckpt_cb
