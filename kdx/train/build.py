"""What a run trains: the seeded datamodule (its views decided now), the task's module, the checks that need both
(batch size, checkpoint.monitor, a resume checkpoint that fits), and the pl.Trainer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from kdx.checkpoints import check_resume_fits
from kdx.configs import build_datamodule
from kdx.tasks import task_for
from kdx.train.checks import check_batch_size, check_monitor
from kdx.train.prepare import PreparedRun
from kdx.train.trainer import build_trainer


@dataclass
class RunParts:
    """The built run: datamodule (set up for fit), module, its parameter counts, the Trainer and its checkpoint
    callback (None when checkpoints are off)."""

    dm: Any
    module: pl.LightningModule
    params: dict[str, Any]
    trainer: pl.Trainer
    ckpt_cb: Any


def build_run(cfg: DictConfig, run_dir: Path, prepared: PreparedRun) -> RunParts:
    """Seed everything with cfg.seed, build the datamodule with the task's data options and the task's module,
    refuse settings the built module and data cannot train (one ConfigError each), check that the resume
    checkpoint fits the module, then build the Trainer."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_flush_denormal(True)  # tiny weights late in SGD otherwise slow CPU math several-fold
    task = task_for(cfg)
    dm = build_datamodule(cfg.data, task.data_options())  # its views decided now: the seed, the teacher cache
    dm.setup("fit")
    built = task.create(dm)
    module = built.module
    check_batch_size(dm, cfg.data.get("batch_size"))
    check_monitor(module, dm, (cfg.get("checkpoint") or {}).get("monitor"))
    resume_state = prepared.take_resume_state()
    if resume_state is not None:
        check_resume_fits(prepared.resume_ckpt, module, checkpoint=resume_state)
    del resume_state  # free the tensors before Lightning reads the file again
    trainer, ckpt_cb = build_trainer(cfg, run_dir)
    return RunParts(dm, module, built.params, trainer, ckpt_cb)
