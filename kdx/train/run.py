"""One training run from a composed config: data + networks -> LightningModule -> Trainer -> results.json.

`run_training(cfg, run_dir)` is the one path every entry point takes (kdx-train, each stage of kdx-pipeline,
every sweep job, the DDP worker, the scripts and the tests). It validates the config (kdx.tasks), decides
what to do with the folder (kdx.runs), builds the datamodule and the task's module, trains, tests, and
records the run in results.json.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException
from rich.console import Console

import kdx
from kdx.checkpoints import check_resume_fits, read_checkpoint
from kdx.configs import build_datamodule, to_dict
from kdx.errors import DiskFullError, KdxError, NonFiniteError, RunInterrupted
from kdx.io import (RESULTS_FILE, atomic_path, claim_folder, clean_stale_temporaries, config_hash, disk_full_cause,
                    disk_full_sentence, read_results, release_folder, write_json)
from kdx.progress import RunClock
from kdx.ranks import is_global_zero_process, is_rank_zero
from kdx.runs import (LAST_CKPT, RESUME_CKPT_ENV, RESUME_KEYS, check_run_dir, default_resume_command,
                      without_resume_keys)
from kdx.tasks import task_for, validate_config
from kdx.train.checks import check_batch_size, check_monitor
from kdx.train.ddp import (decided_by_rank_zero, in_cluster_group, join_cluster, needs_isolated_ddp, run_ddp_worker,
                           tell_ranks_failed)
from kdx.train.metrics_csv import merge_parts, trim_rows_after
from kdx.train.trainer import InterruptState, build_trainer
from kdx.train.wandb_logging import finish_wandb, wandb_info


def hparams_summary(cfg: DictConfig) -> dict[str, Any]:
    """The few settings reports group by: pair, architectures, temperature, alpha, seed, data."""
    summary = {"task": cfg.task.name, "network": cfg.task.network, "pair": cfg.get("pair", {}).get("name"),
               "teacher": cfg.teacher.get("name"), "student": cfg.student.get("name"), "seed": cfg.seed,
               "data": cfg.data.get("name")}
    task = task_for(cfg)
    if task.distills:
        distill = to_dict(cfg.distill)
        summary.update(method=distill.get("method"), alpha=task.distill_section()[0].alpha,
                       mix=sorted(distill.get("mix") or {}))
        for key in ("temperature", "beta"):  # the hyper-parameters sweeps vary most, as report columns
            if distill.get(key) is not None:
                summary[key] = float(distill[key])
    return summary


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of a config that decides a run's result (what the config hash covers when reusing runs).

    Logging, progress display and resume/force are left out, and so are the sections the task does not read
    (kdx.tasks.Task.unread_sections): a teacher run's identity does not change when only the temperature does.
    """
    data = to_dict(cfg)
    for key in ("logger", "hydra", *RESUME_KEYS):
        data.pop(key, None)
    for key in ("progress_bar", "progress_every"):  # what is printed, not what is trained
        (data.get("trainer") or {}).pop(key, None)
    for key in task_for(cfg).unread_sections():
        data.pop(key, None)
    return data


def run_config_hash(cfg: DictConfig) -> str:
    """config_hash of the run's identity (see run_identity): equal hashes mean the same run was asked for."""
    return config_hash(run_identity(cfg))


def _is_interrupt(error: BaseException, trainer: pl.Trainer | None) -> bool:
    """True for Ctrl-C and SIGTERM: Lightning turns Ctrl-C during fit/test into SystemExit(1) after marking
    the trainer interrupted, and SIGTERM into SIGTERMException."""
    if isinstance(error, (KeyboardInterrupt, SIGTERMException)):
        return True
    return isinstance(error, SystemExit) and trainer is not None and bool(getattr(trainer, "interrupted", False))


def _interrupt_name(error: BaseException) -> str:
    return "SIGTERM" if isinstance(error, SIGTERMException) else "Ctrl-C"


def _kept_checkpoints(run_dir: Path, ckpt_cb: Any) -> dict[str, str | None]:
    """The checkpoint files on disk: best (by checkpoint.monitor) and last (end of the last finished epoch)."""
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    last = run_dir / LAST_CKPT
    return {"best": best if best and Path(best).is_file() else None, "last": str(last) if last.is_file() else None}


def _train_epoch_times(trainer: pl.Trainer) -> list[float]:
    """Seconds of each epoch's training loop in this fit (no set-up, no validation), for throughput."""
    clock = next((c for c in trainer.callbacks if isinstance(c, RunClock)), None)
    return [round(t, 3) for t in clock.train_times] if clock is not None else []


def run_training(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, *,
                 multirun: bool = False, _worker: bool = False, resume_command: str | None = None) -> dict[str, Any]:
    """Train, validate and test one network as `cfg` says, writing checkpoints, metrics.csv and results.json.

    The process takes the folder first (kdx.io.claim_folder: a second live process is refused) and removes
    temporaries a killed run left there. A re-run of a finished run returns its results without training (see
    kdx.runs.check_run_dir); on ranks > 0 of a DDP run the returned results are not written to disk. In a
    multirun, a DDP job runs in its own process tree. Ctrl-C or SIGTERM ends it with status `interrupted`, the
    command that resumes it, and a RunInterrupted error; a NaN/inf loss with status `failed` and a NonFiniteError.
    """
    run_dir = Path(run_dir).resolve()
    validate_config(cfg)
    if not _worker:  # a torchrun/srun job: every rank joins its process group before rank 0 decides (kdx.train.ddp)
        join_cluster(to_dict(cfg.trainer))
    claim = is_global_zero_process() and not _worker  # the isolated DDP worker runs under its parent's claim
    if claim:
        try:
            claim_folder(run_dir)
        except BaseException as e:
            tell_ranks_failed(e)
            raise
    try:
        return _run_training(cfg, run_dir, overrides, multirun=multirun, _worker=_worker, resume_command=resume_command)
    finally:
        if claim:
            release_folder(run_dir)


def _run_training(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, *, multirun: bool, _worker: bool,
                  resume_command: str | None) -> dict[str, Any]:
    owner = is_global_zero_process()
    shared = not _worker and in_cluster_group()  # torchrun/srun started every rank: rank 0 decides for all
    if (_worker or not owner) and not shared:  # rank 0 already decided; it passes the checkpoint in the environment
        resume_ckpt = Path(os.environ[RESUME_CKPT_ENV]) if os.environ.get(RESUME_CKPT_ENV) else None
        action = "resume" if resume_ckpt else "fresh"
    else:
        def decide() -> tuple[str, Path | None, dict | None]:
            removed = clean_stale_temporaries(run_dir)
            if removed:
                print(f"[kdx] removed {len(removed)} temporary file(s) a killed run left in {run_dir}", flush=True)
            return check_run_dir(run_dir, cfg, run_identity, multirun=multirun)

        action, resume_ckpt, previous = decided_by_rank_zero(decide if owner else None) if shared else decide()
        if action == "skip":
            if owner:
                print(f"[kdx] {run_dir} already holds this finished run; skipped (force=true reruns it)", flush=True)
            return previous
        if owner:
            os.environ[RESUME_CKPT_ENV] = str(resume_ckpt) if resume_ckpt else ""  # inherited by DDP ranks > 0
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    previous = read_results(run_dir) if action == "resume" or _worker else None
    resume_command = resume_command or default_resume_command(list(overrides or []), run_dir)
    results: dict[str, Any] = {
        "kdx_version": kdx.__version__, "status": "running", "error": None, "task": cfg.task.name,
        "experiment": cfg.get("run_name"), "run_dir": str(run_dir), "overrides": without_resume_keys(list(overrides or [])),
        "hparams": hparams_summary(cfg), "config_hash": run_config_hash(cfg),
        "started_at": datetime.now().isoformat(timespec="seconds"), "resume_command": resume_command,
    }
    if previous and previous.get("wandb"):
        results["wandb"] = previous["wandb"]
    resume_state = None
    if action == "resume":
        resume_state = read_checkpoint(resume_ckpt)  # weights_only; an unreadable file is named before any work
        results["resumed_from"] = str(resume_ckpt)
        results["resumes"] = int((previous or {}).get("resumes", 0)) + 1
        print(f"[kdx] resuming {run_dir} from {resume_ckpt} (after epoch {int(resume_state.get('epoch', 0)) + 1}, "
              f"step {resume_state.get('global_step')})", flush=True)
    if owner:
        if action == "resume" and not _worker:
            trim_rows_after(run_dir, int(resume_state.get("global_step") or 0))
        elif action == "fresh" and not _worker:  # rows of an abandoned attempt (killed before any checkpoint)
            (run_dir / "metrics.csv").unlink(missing_ok=True)
        try:
            write_json(run_dir / RESULTS_FILE, results)
            with atomic_path(run_dir / "config.yaml") as tmp:
                OmegaConf.save(cfg, tmp, resolve=True)
        except DiskFullError as e:
            error = _run_disk_full(run_dir, e, {}, resume_command)
            results.update(status="failed", error=f"{type(error).__name__}: {error}")
            results.pop("resume_command", None)
            try:  # the removed temporary may have left room for this small file
                write_json(run_dir / RESULTS_FILE, results)
            except DiskFullError:
                pass
            raise error from None
    if multirun and owner and not _worker and needs_isolated_ddp(to_dict(cfg.trainer)):
        code = run_ddp_worker(run_dir, resume_ckpt)
        final = read_results(run_dir) or {}
        if final.get("status") == "interrupted":
            raise RunInterrupted(f"the DDP job in {run_dir} was interrupted; resume it with: {resume_command}")
        if code != 0 or final.get("status") != "completed":
            raise KdxError(f"the DDP job in {run_dir} failed (exit code {code}): {final.get('error') or 'see its log'}")
        return final
    trainer = ckpt_cb = None
    sigint, ctrl_c = _watch_sigint()
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        torch.set_flush_denormal(True)  # tiny weights late in SGD otherwise slow CPU math several-fold
        task = task_for(cfg)
        dm = build_datamodule(cfg.data, task.data_options())  # its views decided now: the seed, the teacher cache
        dm.setup("fit")
        built = task.create(dm)
        module = built.module
        check_batch_size(dm, cfg.data.get("batch_size"))
        check_monitor(module, dm, (cfg.get("checkpoint") or {}).get("monitor"))
        if resume_state is not None:
            check_resume_fits(resume_ckpt, module, checkpoint=resume_state)
            resume_state = None  # free the tensors before Lightning reads the file again
        trainer, ckpt_cb = build_trainer(cfg, run_dir)
        results.update(params=built.params, data=dm.describe())
        info = wandb_info(trainer, run_dir)
        if info:  # the W&B run id and mode, so that a resumed run continues the same W&B run
            results["wandb"] = info
        if owner:  # the W&B run id is on disk before training starts (a killed run resumes into it)
            write_json(run_dir / RESULTS_FILE, results)
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
        results.update(
            status="completed", metrics=metrics,
            monitor={"metric": monitor, "mode": cfg.checkpoint.get("mode", "max"),
                     "best": metrics.get(f"best_{monitor}")},
            time={"fit_s": round(fit_s, 2), "test_s": round(test_s, 2), "total_s": round(time.time() - started, 2),
                  "train_epoch_s": _train_epoch_times(trainer)},
            checkpoints=_kept_checkpoints(run_dir, ckpt_cb),
            epochs=int(trainer.current_epoch), global_step=int(trainer.global_step),
        )
    except BaseException as e:
        # after Ctrl-C, loader workers may die first and surface as another error: it is still an interrupt
        interrupted = _is_interrupt(e, trainer) or bool(ctrl_c)
        kept = _kept_checkpoints(run_dir, ckpt_cb)
        full = None if interrupted else disk_full_cause(e)
        error = _run_disk_full(run_dir, full, kept, resume_command) if full is not None else e
        results.update(status="interrupted" if interrupted else "failed",
                       error=None if interrupted else f"{type(error).__name__}: {error}",
                       time={"total_s": round(time.time() - started, 2)}, checkpoints=kept)
        if not interrupted and not isinstance(error, KdxError):
            results["traceback"] = traceback.format_exc(limit=20)
        if not ((interrupted or full is not None) and kept["last"]):  # nothing a resume could continue
            results.pop("resume_command", None)
        try:
            _finish_wandb(trainer, results, failed=True)
        finally:
            if is_rank_zero():
                try:
                    write_json(run_dir / RESULTS_FILE, results)
                except DiskFullError:  # results.json keeps its last whole version; the sentence below says why
                    if full is None:
                        raise
        if full is not None:
            raise error from None
        if interrupted:
            if kept["last"]:
                raise RunInterrupted(f"run {run_dir} interrupted ({_interrupt_name(e)}); its last finished epoch is "
                                     f"saved in {kept['last']}; resume it with: {resume_command}") from None
            raise RunInterrupted(f"run {run_dir} interrupted ({_interrupt_name(e)}) before its first epoch finished, "
                                 f"so there is nothing to resume; run the command again to start over") from None
        raise
    finally:
        _restore_sigint(sigint)
    results["finished_at"] = datetime.now().isoformat(timespec="seconds")
    _finish_wandb(trainer, results, failed=False)
    if is_rank_zero():
        write_json(run_dir / RESULTS_FILE, results)
    return results


def _run_disk_full(run_dir: Path, full: OSError, kept: dict[str, Any], resume_command: str) -> DiskFullError:
    """One sentence for a run stopped by a full disk (or quota): the folder, and how to go on from there."""
    after = (f"then resume it with: {resume_command}" if kept.get("last") else
             "then run the same command again")
    error = DiskFullError(f"run {run_dir} stopped: {disk_full_sentence(full)}; its files are whole (every write "
                          f"goes through a temporary file); free space there (or give hydra.run.dir on a disk with "
                          f"room), {after}")
    error.target, error.quota = getattr(full, "target", None) or full.filename, getattr(full, "quota", False)
    return error


def _watch_sigint() -> tuple[Any, list]:
    """Note Ctrl-C (SIGINT) in a list; the first one while a Trainer runs is left to
    kdx.train.trainer.InterruptCheck (acted on at the next batch boundary), any other interrupts at once.
    Returns (the previous handler, the list)."""
    previous = signal.getsignal(signal.SIGINT)
    hits: list = []
    InterruptState.requested = 0
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        return previous, hits

    def note(signum, frame):
        hits.append(signum)
        InterruptState.requested += 1
        if InterruptState.cooperative and InterruptState.requested == 1:
            return
        if callable(previous):
            previous(signum, frame)  # Python's default handler raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    return previous, hits


def _restore_sigint(handler: Any) -> None:
    """Put back the Ctrl-C handler Lightning replaced (it ignores SIGINT after a first Ctrl-C, for good)."""
    InterruptState.cooperative = False
    if threading.current_thread() is threading.main_thread() and handler is not None:
        try:
            signal.signal(signal.SIGINT, handler)
        except (ValueError, TypeError):  # pragma: no cover
            pass


def _finish_wandb(trainer: pl.Trainer | None, results: dict[str, Any], failed: bool) -> None:
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
    console.print(f"run folder: {results['run_dir']}")
