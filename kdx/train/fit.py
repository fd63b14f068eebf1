"""Train and test a built run: fit (from the resume checkpoint when there is one), test the best checkpoint, and
the results of a completed run (metrics, the monitor's best, times, checkpoints, epochs and steps)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from kdx.errors import NonFiniteError
from kdx.progress import RunClock
from kdx.train.build import RunParts
from kdx.train.metrics_csv import merge_parts
from kdx.train.record import kept_checkpoints


def _fit_clock(trainer: pl.Trainer) -> dict[str, Any]:
    """`train_epoch_s`: seconds of each epoch's training loop in this fit (no set-up, no validation), for
    throughput; `fit_epochs`: the epochs this fit trained, which a resumed run's `fit_s` covers (the epochs before
    the resume were timed by the fit they were trained in)."""
    clock = next((c for c in trainer.callbacks if isinstance(c, RunClock)), None)
    if clock is None:
        return {"train_epoch_s": [], "fit_epochs": int(trainer.current_epoch)}
    return {"train_epoch_s": [round(t, 3) for t in clock.train_times], "fit_epochs": len(clock.epoch_times)}


def fit_and_test(cfg: DictConfig, run_dir: Path, parts: RunParts, resume_ckpt: Path | None,
                 started: float) -> dict[str, Any]:
    """Fit, then test the best checkpoint (the last weights without one); merge the ranks' metrics.csv parts.
    Returns the results of the completed run; a NaN/inf final metric is a NonFiniteError instead."""
    trainer, module, dm, ckpt_cb = parts.trainer, parts.module, parts.dm, parts.ckpt_cb
    t0 = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    fit_s = time.time() - t0
    val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    t0 = time.time()
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    test_out = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
    test_s = time.time() - t0
    if trainer.is_global_zero:
        merge_parts(run_dir)
    metrics = {**val_metrics, **{k: float(v) for k, v in (test_out[0] if test_out else {}).items()}}
    bad = sorted(k for k, v in metrics.items() if v != v or v in (float("inf"), float("-inf")))
    if bad:
        raise NonFiniteError(f"the final metrics {', '.join(bad)} are not finite, so the run is not reported as "
                             f"completed; lower optim.lr or check the data and the loss")
    monitor = cfg.checkpoint.get("monitor")
    if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
        metrics[f"best_{monitor}"] = float(ckpt_cb.best_model_score)
    cache = _teacher_cache_summary(trainer, module)
    return dict(
        status="completed", metrics=metrics,
        monitor={"metric": monitor, "mode": cfg.checkpoint.get("mode", "max"),
                 "best": metrics.get(f"best_{monitor}")},
        time={"fit_s": round(fit_s, 2), "test_s": round(test_s, 2), "total_s": round(time.time() - started, 2),
              **_fit_clock(trainer)},
        checkpoints=kept_checkpoints(run_dir, ckpt_cb),
        epochs=int(trainer.current_epoch), global_step=int(trainer.global_step),
        **({"teacher_cache": cache} if cache else {}),
    )


def _teacher_cache_summary(trainer: pl.Trainer, module: Any) -> dict[str, Any] | None:
    """The teacher cache's hits and misses over this fit (a resumed run: since the resume), summed over the ranks;
    None without a cache."""
    cache = getattr(getattr(module, "teacher_source", None), "cache", None)
    if cache is None:
        return None
    counts = torch.tensor([cache.run_hits, cache.run_misses], dtype=torch.float64, device=trainer.strategy.root_device)
    counts = trainer.strategy.reduce(counts, reduce_op="sum") if trainer.world_size > 1 else counts
    return cache.run_summary(hits=int(counts[0]), misses=int(counts[1]))
