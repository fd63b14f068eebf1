"""A run's record in its folder: results.json when training starts, when it ends and when it stops (failed,
interrupted or out of disk, with the checkpoints kept and the command that resumes it), the W&B run closed with
it, and the short summary printed at the end."""
from __future__ import annotations

import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from rich.console import Console

from kdx.errors import DiskFullError, KdxError, RunInterrupted
from kdx.io import RESULTS_FILE, disk_full_cause, disk_full_sentence, write_json
from kdx.ranks import is_rank_zero
from kdx.runs import LAST_CKPT
from kdx.train.interrupts import interrupt_name, is_interrupt
from kdx.train.wandb_logging import finish_wandb, wandb_info


def kept_checkpoints(run_dir: Path, ckpt_cb: Any) -> dict[str, str | None]:
    """The checkpoint files on disk: best (by checkpoint.monitor) and last (end of the last finished epoch)."""
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    last = run_dir / LAST_CKPT
    return {"best": best if best and Path(best).is_file() else None, "last": str(last) if last.is_file() else None}


def run_disk_full(run_dir: Path, full: OSError, kept: dict[str, Any], resume_command: str) -> DiskFullError:
    """One sentence for a run stopped by a full disk (or quota): the folder, and how to go on from there."""
    after = (f"then resume it with: {resume_command}" if kept.get("last") else
             "then run the same command again")
    error = DiskFullError(f"run {run_dir} stopped: {disk_full_sentence(full)}; its files are whole (every write "
                          f"goes through a temporary file); free space there (or give hydra.run.dir on a disk with "
                          f"room), {after}")
    error.target, error.quota = getattr(full, "target", None) or full.filename, getattr(full, "quota", False)
    return error


def record_training_start(results: dict[str, Any], trainer: pl.Trainer, run_dir: Path, owner: bool,
                          params: dict[str, Any], data: dict[str, Any]) -> None:
    """Add the network's parameter counts, the data's description and the W&B run (id and mode, so that a resumed
    run continues the same W&B run) to `results`; the owner writes them before training starts, so a killed run
    resumes into the same W&B run."""
    results.update(params=params, data=data)
    info = wandb_info(trainer, run_dir)
    if info:
        results["wandb"] = info
    if owner:
        write_json(run_dir / RESULTS_FILE, results)


def record_failure(error: BaseException, results: dict[str, Any], run_dir: Path, trainer: pl.Trainer | None,
                   ckpt_cb: Any, started: float, resume_command: str, ctrl_c: bool) -> BaseException | None:
    """Record a run that stopped on `error` (call it while handling the error): status `interrupted` (Ctrl-C,
    SIGTERM, or `ctrl_c` noted by the SIGINT handler) or `failed`, the checkpoints kept, the resume command only
    where a resume could continue, the traceback of an unexpected error; the W&B run is closed and rank 0 writes
    results.json. Returns the error to raise instead (a DiskFullError sentence, a RunInterrupted naming how to
    resume), or None to re-raise `error` itself."""
    # after Ctrl-C, loader workers may die first and surface as another error: it is still an interrupt
    interrupted = is_interrupt(error, trainer) or ctrl_c
    kept = kept_checkpoints(run_dir, ckpt_cb)
    full = None if interrupted else disk_full_cause(error)
    stated = run_disk_full(run_dir, full, kept, resume_command) if full is not None else error
    results.update(status="interrupted" if interrupted else "failed",
                   error=None if interrupted else f"{type(stated).__name__}: {stated}",
                   time={"total_s": round(time.time() - started, 2)}, checkpoints=kept)
    if not interrupted and not isinstance(stated, KdxError):
        results["traceback"] = traceback.format_exc(limit=20)
    if not ((interrupted or full is not None) and kept["last"]):  # nothing a resume could continue
        results.pop("resume_command", None)
    try:
        close_wandb(trainer, results, failed=True)
    finally:
        if is_rank_zero():
            try:
                write_json(run_dir / RESULTS_FILE, results)
            except DiskFullError:  # results.json keeps its last whole version; the sentence below says why
                if full is None:
                    raise
    if full is not None:
        return stated
    if interrupted:
        if kept["last"]:
            return RunInterrupted(f"run {run_dir} interrupted ({interrupt_name(error)}); its last finished epoch is "
                                  f"saved in {kept['last']}; resume it with: {resume_command}")
        return RunInterrupted(f"run {run_dir} interrupted ({interrupt_name(error)}) before its first epoch finished, "
                              f"so there is nothing to resume; run the command again to start over")
    return None


def record_success(results: dict[str, Any], trainer: pl.Trainer | None, run_dir: Path) -> None:
    """Stamp the finish time, close the W&B run and (rank 0) write the completed results.json."""
    results["finished_at"] = datetime.now().isoformat(timespec="seconds")
    close_wandb(trainer, results, failed=False)
    if is_rank_zero():
        write_json(run_dir / RESULTS_FILE, results)


def close_wandb(trainer: pl.Trainer | None, results: dict[str, Any], failed: bool) -> None:
    """Close this run's W&B run (a multirun opens the next job's run in the same process)."""
    if trainer is not None and "wandb" in results:
        finish_wandb(trainer, results, failed=failed)


def print_results(results: dict[str, Any], file=sys.stdout) -> None:
    """A short human summary of a finished run."""
    console = Console(file=file, soft_wrap=True)  # one line per result, however narrow the log
    metrics = results.get("metrics", {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test/"))
    console.print(f"[bold]{results.get('experiment')}[/] ({results['task']}) finished in "
                  f"{results['time']['total_s']:.1f}s: {shown}")
    cache = results.get("teacher_cache")
    if cache:
        where = "memory" if cache.get("dir") is None else f"{cache['mode']}, {cache['dir']}"
        share = (f" (the teacher ran on {1 - cache['hit_rate']:.1%} of the student's images)"
                 if cache["hits"] + cache["misses"] else "")
        console.print(f"teacher cache ({where}): {cache['hits']:,} hits, {cache['misses']:,} misses{share}",
                      highlight=False)
    console.print(f"run folder: {results['run_dir']}")
