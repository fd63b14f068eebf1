"""One training run from a composed config: data + networks -> LightningModule -> Trainer -> results.json.

Everything here takes the config and an output folder explicitly, so kdx-train, kdx-pipeline and tests
all run the same code.
"""
from __future__ import annotations

import csv
import io
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

import kdx
from kdx.checkpoints import load_network
from kdx.configs import build_datamodule, to_dict
from kdx.errors import CheckpointError, ConfigError, KdxError, NonFiniteError, RunExistsError, RunInterrupted
from kdx.io import (RESULTS_FILE, atomic_path, atomic_write_text, claim_folder, clean_stale_temporaries, config_hash,
                    read_results, release_folder, write_json)
from kdx.lit import ClassifierModule, DistillationModule, LinearProbeModule, check_alpha
from kdx.lit.distill import apply_teacher_cache
from kdx.distill import build_distiller_set, enable_sample_indices, split_distill_config
from kdx.models import build_model, find_head
from kdx.progress import RunClock
from kdx.ranks import is_global_zero_process, is_rank_zero
from kdx.sweep import LAST_CKPT, RESUME_CKPT_ENV, needs_isolated_ddp, run_ddp_worker, set_aside
from kdx.trainer import build_trainer

TASKS = ("supervised", "transfer", "distill", "probe", "face", "face_distill")


def validate_config(cfg: DictConfig) -> None:
    """Catch bad values where they enter, each with a sentence naming the key."""
    if "pipeline" in cfg and cfg.get("pipeline") is not None:
        raise ConfigError("this experiment describes a pipeline; run it with kdx-pipeline, not kdx-train")
    task = cfg.task.name
    if task not in TASKS:
        raise ConfigError(f"task.name must be one of {', '.join(TASKS)}, got {task!r}")
    if cfg.task.get("network") not in ("teacher", "student"):
        raise ConfigError(f"task.network must be 'teacher' or 'student', got {cfg.task.get('network')!r}")
    if task in ("distill", "face_distill"):
        check_alpha(cfg.distill.get("alpha", 0.9))
        split_distill_config(to_dict(cfg.distill))  # unknown methods and misplaced keys, named, before any work
        if task == "face_distill":
            if not cfg.teacher.get("ckpt") and not cfg.teacher.get("pretrained") and not cfg.teacher.get("onnx"):
                raise ConfigError("face distillation needs a teacher: set teacher.onnx=PATH|sface (an ONNX embedding "
                                  "model), teacher.ckpt=PATH (a task=face run) or teacher.pretrained=WEIGHTS")
        elif not cfg.teacher.get("ckpt") and not cfg.teacher.get("pretrained"):
            raise ConfigError("distillation needs a trained teacher: set teacher.ckpt=PATH (a kdx-train checkpoint) "
                              "or teacher.pretrained=true")
    if task == "probe" and not cfg.teacher.get("ckpt") and not cfg.teacher.get("pretrained"):
        raise ConfigError("a probe needs a trained teacher: set teacher.ckpt=PATH or teacher.pretrained=true")
    validate_numbers(cfg)


def _number_at(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _check_number(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False, integer: bool = False,
                  allowed: tuple = (), hint: str = "") -> None:
    """A ConfigError naming `key` unless its value (when set) is a finite number within the bounds."""
    import math

    value = _number_at(cfg, key)
    if value is None or value in allowed:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "a whole number" if integer else "a finite number"
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        extra = f" {' and '.join(bounds)}" if bounds else ""
        raise ConfigError(f"{key} must be {kind}{extra}, got {value!r}" + (f"; {hint}" if hint else ""))


def validate_numbers(cfg: DictConfig) -> None:
    """Numbers that would make a run silently wrong (NaN loss, no training) are refused before any work."""
    max_steps = _number_at(cfg, "trainer.max_steps")
    by_steps = isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0
    _check_number(cfg, "trainer.max_epochs", 1, integer=True, allowed=(-1,) if by_steps else (),
                  hint="a run needs at least one epoch")
    _check_number(cfg, "trainer.max_steps", 1, integer=True, allowed=(-1,))
    _check_number(cfg, "data.batch_size", 1, integer=True)
    _check_number(cfg, "data.eval_batch_size", 1, integer=True)
    _check_number(cfg, "data.num_workers", 0, integer=True)
    _check_number(cfg, "optim.lr", 0, low_open=True, hint="set a positive learning rate, e.g. optim.lr=0.05")
    _check_number(cfg, "optim.weight_decay", 0)
    _check_number(cfg, "optim.momentum", 0, 1, high_open=True)
    _check_number(cfg, "optim.warmup_epochs", 0)
    _check_number(cfg, "optim.min_lr_ratio", 0, 1)
    _check_number(cfg, "task.label_smoothing", 0, 1, high_open=True)
    if cfg.task.name in ("distill", "face_distill"):
        distill = to_dict(cfg.distill) or {}
        sections = {"distill": distill, **{f"distill.mix.{m}": v for m, v in (distill.get("mix") or {}).items()
                                           if isinstance(v, dict)}}
        for prefix, section in sections.items():
            if "temperature" in section:
                _check_number(cfg, f"{prefix}.temperature", 0, low_open=True)
            if "weight" in section:
                _check_number(cfg, f"{prefix}.weight", 0)


def build_network(spec: DictConfig, num_classes: int, in_chans: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A network from a model spec {name, pretrained, ckpt, kwargs}, with the metadata to rebuild it later."""
    spec = to_dict(spec)
    if spec.get("ckpt"):
        net, meta = load_network(spec["ckpt"], num_classes=num_classes)
        return net, {k: meta[k] for k in ("model_name", "in_chans", "model_kwargs") if k in meta}
    kwargs = dict(spec.get("kwargs") or {})
    net = build_model(spec["name"], num_classes=num_classes, in_chans=in_chans,
                      pretrained=spec.get("pretrained") or False, **kwargs)
    return net, {"model_name": spec["name"], "in_chans": in_chans, "model_kwargs": kwargs}


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def build_module(cfg: DictConfig, dm) -> tuple[pl.LightningModule, dict[str, int]]:
    """The LightningModule of `task.name`, and the parameter counts of its networks."""
    task, optim = cfg.task, to_dict(cfg.optim)
    if hasattr(dm, "view_seed"):
        dm.view_seed = int(cfg.seed)  # seeded views (data.seeded_views, the teacher cache) follow the run's seed
    if task.name != "distill" and (cfg.data.get("use_unlabeled") or cfg.data.get("unlabeled")):
        raise ConfigError(f"data.use_unlabeled / data.unlabeled add images without labels, which only distillation "
                          f"can learn from; drop them for task={task.name}, or use task=distill")
    if task.name in ("face", "face_distill"):
        from kdx.lit.face import build_face_module

        return build_face_module(cfg, dm)
    num_classes, in_chans = dm.num_classes, dm.in_chans
    if task.name == "probe":
        teacher, _ = build_network(cfg.teacher, num_classes, in_chans)
        num_features = find_head(teacher)[1].in_features if task.get("probe_inputs", "features") == "features" else num_classes
        module = LinearProbeModule(teacher, num_classes, num_features, loss=task.get("probe_loss", "bce"),
                                   inputs=task.get("probe_inputs", "features"), optim=optim)
        return module, {"network": count_parameters(module.head), "teacher": count_parameters(teacher)}
    net, meta = build_network(cfg[task.network], num_classes, in_chans)
    meta.update(class_names=list(dm.class_names), image_size=dm.image_size)
    common = dict(optim=optim, label_smoothing=float(task.get("label_smoothing", 0.0)), model_meta=meta,
                  freeze_backbone=bool(task.get("freeze_backbone", False)),
                  backbone_lr_scale=float(task.get("backbone_lr_scale", 1.0)),
                  l2sp_weight=float(task.get("l2sp_weight", 0.0)))
    if task.name == "distill":
        distill = to_dict(cfg.distill)
        host = {k: distill.pop(k) for k in ("alpha", "save_teacher", "teacher_cache") if k in distill}
        distillers = build_distiller_set(distill, task="classification")
        enable_sample_indices(dm, distillers)
        teacher, _ = build_network(cfg.teacher, num_classes, in_chans)
        module = DistillationModule(net, teacher, num_classes, distill=distillers, alpha=host.get("alpha", 0.9),
                                    save_teacher=bool(host.get("save_teacher", False)),
                                    example_input=example_images(dm), num_samples=len(dm.train_set), **common)
        apply_teacher_cache(module, dm, to_dict(cfg.data), host.get("teacher_cache"), int(cfg.seed),
                            cfg.trainer.get("max_epochs"), teacher_spec=to_dict(cfg.teacher))
        module.channels_last = bool(cfg.trainer.get("channels_last", False))
        module.compile_networks = bool(cfg.trainer.get("compile", False))
        return module, {"network": count_parameters(net), "teacher": count_parameters(teacher)}
    module = ClassifierModule(net, num_classes, **common)
    module.channels_last = bool(cfg.trainer.get("channels_last", False))
    module.compile_networks = bool(cfg.trainer.get("compile", False))
    return module, {"network": count_parameters(net)}


def example_images(dm, n: int = 2) -> torch.Tensor:
    """The first `n` training images, stacked (a probe batch for sizing distillers' connectors)."""
    return torch.stack([dm.train_set[i][0] for i in range(min(n, len(dm.train_set)))])


def hparams_summary(cfg: DictConfig) -> dict[str, Any]:
    """The few settings reports group by: pair, architectures, temperature, alpha, seed, data."""
    summary = {"task": cfg.task.name, "network": cfg.task.network, "pair": cfg.get("pair", {}).get("name"),
               "teacher": cfg.teacher.get("name"), "student": cfg.student.get("name"), "seed": cfg.seed,
               "data": cfg.data.get("name")}
    if cfg.task.name in ("distill", "face_distill"):
        distill = to_dict(cfg.distill)
        summary.update(method=distill.get("method"), alpha=float(distill.get("alpha", 0.9)),
                       mix=sorted(distill.get("mix") or {}))
        for key in ("temperature", "beta"):  # the hyper-parameters sweeps vary most, as report columns
            if distill.get(key) is not None:
                summary[key] = float(distill[key])
    return summary


RESUME_KEYS = {"resume": False, "force": False}  # how to run, not what: left out of the config hash


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of a config that decides a run's result (what the config hash covers when reusing runs).

    Logging, progress display and resume/force are left out, and so are the networks and distillation
    settings a task does not use: a teacher run's identity does not change when only the temperature does.
    """
    data = to_dict(cfg)
    for key in ("logger", "hydra", *RESUME_KEYS):
        data.pop(key, None)
    for key in ("progress_bar", "progress_every"):  # what is printed, not what is trained
        (data.get("trainer") or {}).pop(key, None)
    task = data.get("task", {})
    if task.get("name") not in ("distill", "face_distill"):
        data.pop("distill", None)
        if task.get("name") != "probe":
            data.pop("student" if task.get("network") == "teacher" else "teacher", None)
    return data


def run_config_hash(cfg: DictConfig) -> str:
    """config_hash of the run's identity (see run_identity): equal hashes mean the same run was asked for."""
    return config_hash(run_identity(cfg))


def _resume_value(cfg: DictConfig) -> bool:
    """True unless `resume` is false/null (true and a folder path both mean: continue the run there)."""
    value = cfg.get("resume", False)
    return not (value is None or value is False or str(value).lower() in ("false", "none", "null", ""))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def config_changes(run_dir: Path, cfg: DictConfig) -> list[str]:
    """`key (old -> new)` for every key of the run's identity (see run_identity) that differs between the
    config saved in `run_dir/config.yaml` and `cfg`; ["config.yaml"] when the saved config cannot be read."""
    try:
        saved = run_identity(OmegaConf.load(run_dir / "config.yaml"))
    except Exception:
        return ["config.yaml (missing or unreadable)"]
    old, new = _flatten(saved), _flatten(run_identity(cfg))
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            shown = lambda v: "unset" if v is missing else repr(v)  # noqa: E731
            changes.append(f"{key} ({shown(a)} -> {shown(b)})")
    return changes


def check_run_dir(run_dir: Path, cfg: DictConfig | None = None, multirun: bool = False) -> tuple[str, Path | None, dict | None]:
    """Decide what to do with `run_dir`: ("skip", None, results) for a finished run that is re-run,
    ("resume", last.ckpt, results) for an interrupted one, ("fresh", None, None) otherwise.

    A finished run is never overwritten: a single run without resume=/force= raises RunExistsError, force=true
    moves the old files to `<folder>.replaced-<time>` first. resume=true on a folder with no checkpoint raises
    CheckpointError naming it; on one whose config differs from `cfg` a ConfigError naming the changed keys
    (resume=true force=true continues it with the new config). An interrupted run is never trained over:
    without resume= or force= that is a RunExistsError. In a multirun, finished jobs are skipped and
    interrupted ones with the same config resumed (a changed one is set aside).
    """

    run_dir = Path(run_dir)
    resume = _resume_value(cfg) if cfg is not None else False
    force = bool(cfg.get("force", False)) if cfg is not None else False
    results = read_results(run_dir)
    same = results is not None and cfg is not None and results.get("config_hash") == run_config_hash(cfg)
    last = run_dir / LAST_CKPT
    if results and results.get("status") == "completed":
        if force:
            print(f"[kdx] force=true: the finished run in {run_dir} moved to {set_aside(run_dir, 'replaced')}", flush=True)
            return "fresh", None, None
        if (resume or multirun) and same:
            return "skip", None, results
        if resume or multirun:
            raise RunExistsError(f"{run_dir} already holds a finished run made with a different config; "
                                 f"pass force=true to rerun it (the old one is kept as {run_dir.name}.replaced-TIME) "
                                 f"or choose another folder")
        raise RunExistsError(f"{run_dir} already holds a finished run ({RESULTS_FILE}); resume=true reports it, "
                             f"force=true reruns it (keeping the old one), or choose another output folder "
                             f"(hydra.run.dir=...)")
    if resume and not multirun:
        if not last.is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: it holds no checkpoint ({LAST_CKPT}); "
                                  f"point resume=PATH at the run folder of the interrupted run, or drop resume=")
        changes = config_changes(run_dir, cfg) if cfg is not None else []
        if changes and not force:
            shown = ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
            raise ConfigError(f"cannot resume {run_dir}: the config differs from the interrupted run's in {shown}; "
                              f"resume with the settings it was started with, or add force=true to continue from its "
                              f"checkpoint with the new ones")
        if changes:
            print(f"[kdx] force=true: resuming {run_dir} with a changed config: {', '.join(changes)}", flush=True)
        return "resume", last, results
    if force and run_dir.is_dir() and (results is not None or last.exists()):
        print(f"[kdx] force=true: the unfinished run in {run_dir} moved to {set_aside(run_dir, 'replaced')}", flush=True)
        return "fresh", None, None
    if multirun and last.is_file():
        if same:
            return "resume", last, results
        print(f"[kdx] {run_dir} holds an unfinished run with a different config; moved to "
              f"{set_aside(run_dir, 'incomplete')}", flush=True)
        return "fresh", None, None
    if last.is_file():
        raise RunExistsError(f"{run_dir} holds an unfinished run ({LAST_CKPT}); resume={run_dir} continues it, "
                             f"force=true starts over (keeping the old files as {run_dir.name}.replaced-TIME), or "
                             f"choose another output folder (hydra.run.dir=...)")
    return "fresh", None, None


def _trim_csv_rows(run_dir: Path, global_step: int) -> None:
    """Before resuming from a checkpoint taken after `global_step` steps, drop the metrics.csv rows logged
    after it (the resumed run logs those steps again), and any row a kill cut short."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return
    text = path.read_text()
    if text and not text.endswith("\n"):  # a row the kill cut short (older files were appended in place)
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    columns = list(reader.fieldnames or [])

    def before(row: dict[str, Any]) -> bool:
        try:
            return int(float(row.get("step") or 0)) < global_step and None not in row.values()
        except ValueError:
            return False

    rows = [row for row in reader if before(row)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _merge_csv_parts(run_dir: Path) -> None:
    """Join metrics.part-*.csv and metrics.csv into one metrics.csv (union of columns, rows in order)."""

    parts = sorted(run_dir.glob("metrics.part-*.csv"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not parts:
        return
    files = [*parts, *([run_dir / "metrics.csv"] if (run_dir / "metrics.csv").is_file() else [])]
    rows, columns = [], []
    for path in files:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            rows += list(reader)

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())
    for path in parts:
        path.unlink()


def _is_interrupt(error: BaseException, trainer: pl.Trainer | None) -> bool:
    """True for Ctrl-C and SIGTERM: Lightning turns Ctrl-C during fit/test into SystemExit(1) after marking
    the trainer interrupted, and SIGTERM into SIGTERMException."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    if isinstance(error, (KeyboardInterrupt, SIGTERMException)):
        return True
    return isinstance(error, SystemExit) and trainer is not None and bool(getattr(trainer, "interrupted", False))


def _interrupt_name(error: BaseException) -> str:
    return "SIGTERM" if type(error).__name__ == "SIGTERMException" else "Ctrl-C"


def _kept_checkpoints(run_dir: Path, ckpt_cb: Any) -> dict[str, str | None]:
    """The checkpoint files on disk: best (by checkpoint.monitor) and last (end of the last finished epoch)."""

    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    last = run_dir / LAST_CKPT
    return {"best": best if best and Path(best).is_file() else None, "last": str(last) if last.is_file() else None}


def default_resume_command(overrides: list[str], run_dir: Path) -> str:
    """The kdx-train command line that continues the run in `run_dir`."""
    import shlex

    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in (*RESUME_KEYS, "hydra.run.dir")]
    return " ".join(["kdx-train", *map(shlex.quote, kept), shlex.quote(f"resume={run_dir}")])


def _train_epoch_times(trainer: pl.Trainer) -> list[float]:
    """Seconds of each epoch's training loop in this fit (no set-up, no validation), for throughput."""
    clock = next((c for c in trainer.callbacks if isinstance(c, RunClock)), None)
    return [round(t, 3) for t in clock.train_times] if clock is not None else []


def run_training(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, *,
                 multirun: bool = False, _worker: bool = False, resume_command: str | None = None) -> dict[str, Any]:
    """Train, validate and test one network as `cfg` says, writing checkpoints, metrics.csv and results.json.

    The process takes the folder first (kdx.io.claim_folder: a second live process is refused) and removes
    temporaries a killed run left there. A re-run of a finished run returns its results without training (see
    `check_run_dir`); on ranks > 0 of a DDP run the returned results are not written to disk. In a multirun, a
    DDP job runs in its own process tree. Ctrl-C or SIGTERM ends it with status `interrupted`, the command that
    resumes it, and a RunInterrupted error; a NaN/inf loss with status `failed` and a NonFiniteError.
    """
    run_dir = Path(run_dir).resolve()
    validate_config(cfg)
    claim = is_global_zero_process() and not _worker  # the isolated DDP worker runs under its parent's claim
    if claim:
        claim_folder(run_dir)
    try:
        return _run_training(cfg, run_dir, overrides, multirun=multirun, _worker=_worker, resume_command=resume_command)
    finally:
        if claim:
            release_folder(run_dir)


def _run_training(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, *, multirun: bool, _worker: bool,
                  resume_command: str | None) -> dict[str, Any]:
    from kdx.checkpoints import check_resume_fits, read_checkpoint

    owner = is_global_zero_process()
    if _worker or not owner:  # rank 0 already decided; it passes the checkpoint to resume from in the environment
        resume_ckpt = Path(os.environ[RESUME_CKPT_ENV]) if os.environ.get(RESUME_CKPT_ENV) else None
        action = "resume" if resume_ckpt else "fresh"
    else:
        removed = clean_stale_temporaries(run_dir)
        if removed:
            print(f"[kdx] removed {len(removed)} temporary file(s) a killed run left in {run_dir}", flush=True)
        action, resume_ckpt, previous = check_run_dir(run_dir, cfg, multirun=multirun)
        if action == "skip":
            print(f"[kdx] {run_dir} already holds this finished run; skipped (force=true reruns it)", flush=True)
            return previous
        os.environ[RESUME_CKPT_ENV] = str(resume_ckpt) if resume_ckpt else ""  # inherited by DDP ranks > 0
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    previous = read_results(run_dir) if action == "resume" or _worker else None
    kept_overrides = [o for o in overrides or [] if o.lstrip("+~").split("=", 1)[0] not in RESUME_KEYS]
    resume_command = resume_command or default_resume_command(list(overrides or []), run_dir)
    results: dict[str, Any] = {
        "kdx_version": kdx.__version__, "status": "running", "error": None, "task": cfg.task.name,
        "experiment": cfg.get("run_name"), "run_dir": str(run_dir), "overrides": kept_overrides,
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
            _trim_csv_rows(run_dir, int(resume_state.get("global_step") or 0))
        elif action == "fresh" and not _worker:  # rows of an abandoned attempt (killed before any checkpoint)
            (run_dir / "metrics.csv").unlink(missing_ok=True)
        write_json(run_dir / RESULTS_FILE, results)
        with atomic_path(run_dir / "config.yaml") as tmp:
            OmegaConf.save(cfg, tmp, resolve=True)
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
        dm = build_datamodule(cfg.data)
        dm.setup("fit")
        module, params = build_module(cfg, dm)
        if resume_state is not None:
            check_resume_fits(resume_ckpt, module, checkpoint=resume_state)
            resume_state = None  # free the tensors before Lightning reads the file again
        trainer, ckpt_cb = build_trainer(cfg, run_dir)
        results.update(params=params, data=dm.describe())
        _note_wandb(results, trainer, run_dir)
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
            _merge_csv_parts(run_dir)
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
        results.update(status="interrupted" if interrupted else "failed",
                       error=None if interrupted else f"{type(e).__name__}: {e}",
                       time={"total_s": round(time.time() - started, 2)}, checkpoints=kept)
        if not interrupted and not isinstance(e, KdxError):
            results["traceback"] = traceback.format_exc(limit=20)
        if not (interrupted and kept["last"]):  # nothing a resume could continue (or a failure it would repeat)
            results.pop("resume_command", None)
        try:
            _finish_wandb(trainer, results, failed=True)
        finally:
            if is_rank_zero():
                write_json(run_dir / RESULTS_FILE, results)
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


def _watch_sigint() -> tuple[Any, list]:
    """Note Ctrl-C (SIGINT) in a list; the first one while a Trainer runs is left to kdx.trainer.InterruptCheck
    (acted on at the next batch boundary), any other interrupts at once. Returns (the previous handler, the list)."""
    import signal
    import threading

    from kdx.trainer import InterruptState

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
    import signal
    import threading

    from kdx.trainer import InterruptState

    InterruptState.cooperative = False

    if threading.current_thread() is threading.main_thread() and handler is not None:
        try:
            signal.signal(signal.SIGINT, handler)
        except (ValueError, TypeError):  # pragma: no cover
            pass


def _note_wandb(results: dict[str, Any], trainer: pl.Trainer, run_dir: Path) -> None:
    """Record the W&B run id and mode in results.json, so a resumed run continues the same W&B run."""
    from kdx.logging_wandb import wandb_info

    info = wandb_info(trainer, run_dir)
    if info:
        results["wandb"] = info


def _finish_wandb(trainer: pl.Trainer | None, results: dict[str, Any], failed: bool) -> None:
    """Close this run's W&B run (a multirun opens the next job's run in the same process)."""
    if trainer is None or "wandb" not in results:
        return
    from kdx.logging_wandb import finish_wandb

    finish_wandb(trainer, results, failed=failed)


def print_results(results: dict[str, Any], file=sys.stdout) -> None:
    """A short human summary of a finished run."""
    from rich.console import Console

    console = Console(file=file, soft_wrap=True)  # one line per result, however narrow the log
    metrics = results.get("metrics", {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test/"))
    console.print(f"[bold]{results.get('experiment')}[/] ({results['task']}) finished in "
                  f"{results['time']['total_s']:.1f}s: {shown}")
    console.print(f"run folder: {results['run_dir']}")
