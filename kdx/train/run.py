"""One training run from a composed config: data + networks -> LightningModule -> Trainer -> results.json.

`run_training(cfg, run_dir)` is the one path every entry point takes (kdx-train, each stage of kdx-pipeline,
every sweep job, the DDP worker, the scripts and the tests). It validates the config (kdx.tasks), claims the
folder, and runs the steps, one module each:
- kdx.train.prepare: what to do with the folder (fresh, resume, skip), the starting results.json and config.yaml;
- kdx.train.build: the datamodule, the task's module, the checks that need both, the Trainer;
- kdx.train.fit: fit, test, the results of a completed run;
- kdx.train.record: results.json at the start of training, at its end and when it stops, the W&B run;
  kdx.train.interrupts: the Ctrl-C handler and telling an interrupt from a failure.
In a multirun a DDP job runs in a process of its own (kdx.train.ddp).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdx.configs import to_dict
from kdx.errors import KdxError, RunInterrupted
from kdx.io import claim_folder, read_results, release_folder
from kdx.ranks import is_global_zero_process
from kdx.tasks import validate_config
from kdx.train.build import build_run
from kdx.train.ddp import join_cluster, needs_isolated_ddp, run_ddp_worker, tell_ranks_failed
from kdx.train.fit import fit_and_test
from kdx.train.identity import hparams_summary, run_config_hash, run_identity
from kdx.train.interrupts import restore_sigint, watch_sigint
from kdx.train.prepare import PreparedRun, prepare_run
from kdx.train.record import print_results, record_failure, record_success, record_training_start

__all__ = ["hparams_summary", "print_results", "run_config_hash", "run_identity", "run_training"]


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
    """prepare -> (the isolated DDP worker, or) build -> fit and test -> record, in the claimed folder."""
    owner = is_global_zero_process()
    prepared = prepare_run(cfg, run_dir, overrides, multirun=multirun, worker=_worker, resume_command=resume_command)
    if prepared.action == "skip":
        return prepared.results
    if multirun and owner and not _worker and needs_isolated_ddp(to_dict(cfg.trainer)):
        return _train_in_own_process(run_dir, prepared)
    results = prepared.results
    trainer = ckpt_cb = None
    sigint, ctrl_c = watch_sigint()
    try:
        parts = build_run(cfg, run_dir, prepared)
        trainer, ckpt_cb = parts.trainer, parts.ckpt_cb
        record_training_start(results, trainer, run_dir, owner, parts.params, parts.dm.describe())
        results.update(fit_and_test(cfg, run_dir, parts, prepared.resume_ckpt, prepared.started))
    except BaseException as e:
        instead = record_failure(e, results, run_dir, trainer, ckpt_cb, prepared.started, prepared.resume_command,
                                 ctrl_c=bool(ctrl_c))
        if instead is not None:
            raise instead from None
        raise
    finally:
        restore_sigint(sigint)
    record_success(results, trainer, run_dir)
    return results


def _train_in_own_process(run_dir: Path, prepared: PreparedRun) -> dict[str, Any]:
    """A DDP job of a multirun: trained by `python -m kdx.train.ddp_worker` (its own process tree, so ranks > 0
    never re-launch the sweep); its results.json, or one sentence when it was interrupted or failed."""
    code = run_ddp_worker(run_dir, prepared.resume_ckpt)
    final = read_results(run_dir) or {}
    if final.get("status") == "interrupted":
        raise RunInterrupted(f"the DDP job in {run_dir} was interrupted; resume it with: {prepared.resume_command}")
    if code != 0 or final.get("status") != "completed":
        raise KdxError(f"the DDP job in {run_dir} failed (exit code {code}): {final.get('error') or 'see its log'}")
    return final
