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
from kdx.errors import CheckpointError, ConfigError, KdxError, RunExistsError
from kdx.io import RESULTS_FILE, atomic_write_text, config_hash, read_results, write_json
from kdx.lit import ClassifierModule, DistillationModule, LinearProbeModule, check_alpha
from kdx.lit.distill import apply_teacher_cache
from kdx.distill import build_distiller_set, enable_sample_indices, split_distill_config
from kdx.models import build_model, find_head
from kdx.trainer import build_trainer

TASKS = ("supervised", "transfer", "distill", "probe", "face", "face_distill")


def to_dict(node: Any) -> Any:
    """A plain Python container from an OmegaConf node (resolved), or the value itself."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


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


def build_datamodule(data_cfg: DictConfig):
    """Instantiate the datamodule of `data._target_`; unknown keys are reported by name."""
    from hydra.utils import instantiate

    kwargs = {k: v for k, v in to_dict(data_cfg).items() if k not in ("name",)}
    try:
        return instantiate(kwargs, _convert_="all")
    except Exception as e:  # hydra wraps TypeError for unknown arguments
        raise ConfigError(f"the data config cannot build {kwargs.get('_target_')}: {e.__cause__ or e}") from e


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
    (data.get("trainer") or {}).pop("progress_bar", None)
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


def check_run_dir(run_dir: Path, cfg: DictConfig | None = None, multirun: bool = False) -> tuple[str, Path | None, dict | None]:
    """Decide what to do with `run_dir`: ("skip", None, results) for a finished run that is re-run,
    ("resume", last.ckpt, results) for an interrupted one, ("fresh", None, None) otherwise.

    A finished run is never overwritten: a single run without resume=/force= raises RunExistsError, force=true
    moves the old files to `<folder>.replaced-<time>` first. resume=true on a folder with no checkpoint raises
    CheckpointError naming it. In a multirun, finished jobs are skipped and interrupted ones resumed.
    """
    from kdx.sweep import LAST_CKPT, set_aside

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
    if force and run_dir.is_dir() and (results is not None or last.exists()):
        print(f"[kdx] force=true: the unfinished run in {run_dir} moved to {set_aside(run_dir, 'replaced')}", flush=True)
        return "fresh", None, None
    if resume and not multirun:
        if last.is_file():
            return "resume", last, results
        raise CheckpointError(f"nothing to resume in {run_dir}: it holds no checkpoint ({LAST_CKPT}); "
                              f"point resume=PATH at the run folder of the interrupted run, or drop resume=")
    if multirun and last.is_file():
        if same:
            return "resume", last, results
        print(f"[kdx] {run_dir} holds an unfinished run with a different config; moved to "
              f"{set_aside(run_dir, 'incomplete')}", flush=True)
    return "fresh", None, None


def _keep_csv_rows(run_dir: Path) -> None:
    """Before resuming, move metrics.csv to metrics.part-N.csv (the CSV logger would delete it)."""
    current = run_dir / "metrics.csv"
    if current.is_file():
        n = 1
        while (run_dir / f"metrics.part-{n}.csv").exists():
            n += 1
        current.rename(run_dir / f"metrics.part-{n}.csv")


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


def _is_global_zero_process() -> bool:
    """True in the process that owns the run folder (rank 0 of node 0), judged from the launch environment."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(key, "0") not in ("0", ""):
            return False
    return _is_rank_zero()


def run_training(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, *,
                 multirun: bool = False, _worker: bool = False) -> dict[str, Any]:
    """Train, validate and test one network as `cfg` says, writing checkpoints, metrics.csv and results.json.

    A re-run of a finished run returns its results without training (see `check_run_dir`); on ranks > 0 of a
    DDP run the returned results are not written to disk. In a multirun, a DDP job runs in its own process tree.
    """
    from kdx.sweep import RESUME_CKPT_ENV, needs_isolated_ddp, run_ddp_worker

    run_dir = Path(run_dir).resolve()
    validate_config(cfg)
    owner = _is_global_zero_process()
    if _worker or not owner:  # rank 0 already decided; it passes the checkpoint to resume from in the environment
        resume_ckpt = Path(os.environ[RESUME_CKPT_ENV]) if os.environ.get(RESUME_CKPT_ENV) else None
        action = "resume" if resume_ckpt else "fresh"
    else:
        action, resume_ckpt, previous = check_run_dir(run_dir, cfg, multirun=multirun)
        if action == "skip":
            print(f"[kdx] {run_dir} already holds this finished run; skipped (force=true reruns it)", flush=True)
            return previous
        os.environ[RESUME_CKPT_ENV] = str(resume_ckpt) if resume_ckpt else ""  # inherited by DDP ranks > 0
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    previous = read_results(run_dir) if action == "resume" or _worker else None
    results: dict[str, Any] = {
        "kdx_version": kdx.__version__, "status": "running", "error": None, "task": cfg.task.name,
        "experiment": cfg.get("run_name"), "run_dir": str(run_dir),
        "overrides": [o for o in overrides or [] if o.lstrip("+~").split("=", 1)[0] not in RESUME_KEYS],
        "hparams": hparams_summary(cfg), "config_hash": run_config_hash(cfg),
        "started_at": datetime.now().isoformat(timespec="seconds"),
    }
    if previous and previous.get("wandb"):
        results["wandb"] = previous["wandb"]
    if action == "resume":
        results["resumed_from"] = str(resume_ckpt)
        results["resumes"] = int((previous or {}).get("resumes", 0)) + 1
        print(f"[kdx] resuming {run_dir} from {resume_ckpt}", flush=True)
    if owner:
        if action == "resume" and not _worker:
            _keep_csv_rows(run_dir)
        write_json(run_dir / RESULTS_FILE, results)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if multirun and owner and not _worker and needs_isolated_ddp(to_dict(cfg.trainer)):
        code = run_ddp_worker(run_dir, resume_ckpt)
        final = read_results(run_dir) or {}
        if code != 0 or final.get("status") != "completed":
            raise KdxError(f"the DDP job in {run_dir} failed (exit code {code}): {final.get('error') or 'see its log'}")
        return final
    trainer = None
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        torch.set_flush_denormal(True)  # tiny weights late in SGD otherwise slow CPU math several-fold
        dm = build_datamodule(cfg.data)
        dm.setup("fit")
        module, params = build_module(cfg, dm)
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
        monitor = cfg.checkpoint.get("monitor")
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
            metrics[f"best_{monitor}"] = float(ckpt_cb.best_model_score)
        results.update(
            status="completed", metrics=metrics,
            monitor={"metric": monitor, "mode": cfg.checkpoint.get("mode", "max"),
                     "best": metrics.get(f"best_{monitor}")},
            time={"fit_s": round(fit_s, 2), "test_s": round(test_s, 2), "total_s": round(time.time() - started, 2)},
            checkpoints={"best": best, "last": ckpt_cb.last_model_path if ckpt_cb is not None else None},
            epochs=int(trainer.current_epoch), global_step=int(trainer.global_step),
        )
    except BaseException as e:
        results.update(status="failed", error=f"{type(e).__name__}: {e}",
                       time={"total_s": round(time.time() - started, 2)})
        if not isinstance(e, KdxError):
            results["traceback"] = traceback.format_exc(limit=20)
        try:
            _finish_wandb(trainer, results, failed=True)
        finally:
            if _is_rank_zero():
                write_json(run_dir / RESULTS_FILE, results)
        raise
    results["finished_at"] = datetime.now().isoformat(timespec="seconds")
    _finish_wandb(trainer, results, failed=False)
    if _is_rank_zero():
        write_json(run_dir / RESULTS_FILE, results)
    return results


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


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def print_results(results: dict[str, Any], file=sys.stdout) -> None:
    """A short human summary of a finished run."""
    from rich.console import Console

    console = Console(file=file)
    metrics = results.get("metrics", {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test/"))
    console.print(f"[bold]{results.get('experiment')}[/] ({results['task']}) finished in "
                  f"{results['time']['total_s']:.1f}s: {shown}")
    console.print(f"run folder: {results['run_dir']}")
