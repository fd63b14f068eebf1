"""Before a run builds anything: what to do with its folder (fresh, resume, or skip a finished run; rank 0 decides
for every rank), the checkpoint it resumes from (read and checked before any work), and the starting record:
results.json with status `running` and config.yaml."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import kdx
from kdx.checkpoints import read_checkpoint
from kdx.errors import DiskFullError
from kdx.io import RESULTS_FILE, atomic_path, clean_stale_temporaries, read_results, write_json
from kdx.ranks import is_global_zero_process
from kdx.runs import RESUME_CKPT_ENV, check_run_dir, default_resume_command, without_resume_keys
from kdx.train.ddp import decided_by_rank_zero, in_cluster_group
from kdx.train.identity import hparams_summary, run_config_hash, run_identity
from kdx.train.metrics_csv import trim_rows_after
from kdx.train.record import run_disk_full


@dataclass
class PreparedRun:
    """What `prepare_run` decided and wrote. `action` is fresh, resume or skip; for skip, `results` is the finished
    run's results.json and nothing else is set."""

    action: str
    results: dict[str, Any] | None
    resume_ckpt: Path | None = None
    resume_state: dict[str, Any] | None = None  # the checkpoint read for resuming (taken once by the build)
    resume_command: str = ""
    started: float = 0.0

    def take_resume_state(self) -> dict[str, Any] | None:
        """The resume checkpoint's contents, dropped from here so that its tensors can be freed once checked."""
        state, self.resume_state = self.resume_state, None
        return state


def prepare_run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, *, multirun: bool, worker: bool,
                resume_command: str | None) -> PreparedRun:
    """Decide what to do with `run_dir` (kdx.runs.check_run_dir on rank 0; other ranks and the isolated DDP worker
    take rank 0's decision), read the checkpoint a resume starts from, and (rank 0) write the starting
    results.json and config.yaml. A full disk is one DiskFullError sentence, recorded in results.json where room
    is left."""
    owner = is_global_zero_process()
    shared = not worker and in_cluster_group()  # torchrun/srun started every rank: rank 0 decides for all
    if (worker or not owner) and not shared:  # rank 0 already decided; it passes the checkpoint in the environment
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
            return PreparedRun("skip", previous)
        if owner:
            os.environ[RESUME_CKPT_ENV] = str(resume_ckpt) if resume_ckpt else ""  # inherited by DDP ranks > 0
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    previous = read_results(run_dir) if action == "resume" or worker else None
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
        if action == "resume" and not worker:
            trim_rows_after(run_dir, int(resume_state.get("global_step") or 0))
        elif action == "fresh" and not worker:  # rows of an abandoned attempt (killed before any checkpoint)
            (run_dir / "metrics.csv").unlink(missing_ok=True)
        try:
            write_json(run_dir / RESULTS_FILE, results)
            with atomic_path(run_dir / "config.yaml") as tmp:
                OmegaConf.save(cfg, tmp, resolve=True)
        except DiskFullError as e:
            error = run_disk_full(run_dir, e, {}, resume_command)
            results.update(status="failed", error=f"{type(error).__name__}: {error}")
            results.pop("resume_command", None)
            try:  # the removed temporary may have left room for this small file
                write_json(run_dir / RESULTS_FILE, results)
            except DiskFullError:
                pass
            raise error from None
    return PreparedRun(action, results, resume_ckpt, resume_state, resume_command, started)
