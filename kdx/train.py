"""One training run from a composed config: data + networks -> LightningModule -> Trainer -> results.json.

Everything here takes the config and an output folder explicitly, so kdx-train, kdx-pipeline and tests
all run the same code.
"""
from __future__ import annotations

import logging
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
from kdx.errors import ConfigError, KdxError, RunExistsError
from kdx.io import RESULTS_FILE, config_hash, read_results, write_json
from kdx.lit import ClassifierModule, DistillationModule, LinearProbeModule, check_alpha
from kdx.losses import check_temperature
from kdx.models import build_model, find_head
from kdx.trainer import build_trainer

log = logging.getLogger("kdx")
TASKS = ("supervised", "transfer", "distill", "probe")


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
    if task == "distill":
        check_temperature(cfg.distill.temperature)
        check_alpha(cfg.distill.alpha)
        if not cfg.teacher.get("ckpt") and not cfg.teacher.get("pretrained"):
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
        teacher, _ = build_network(cfg.teacher, num_classes, in_chans)
        module = DistillationModule(net, teacher, num_classes, temperature=cfg.distill.temperature,
                                    alpha=cfg.distill.alpha, terms=to_dict(cfg.distill.terms),
                                    save_teacher=bool(cfg.distill.get("save_teacher", False)), **common)
        return module, {"network": count_parameters(net), "teacher": count_parameters(teacher)}
    return ClassifierModule(net, num_classes, **common), {"network": count_parameters(net)}


def hparams_summary(cfg: DictConfig) -> dict[str, Any]:
    """The few settings reports group by: pair, architectures, temperature, alpha, seed, data."""
    summary = {"task": cfg.task.name, "network": cfg.task.network, "pair": cfg.get("pair", {}).get("name"),
               "teacher": cfg.teacher.get("name"), "student": cfg.student.get("name"), "seed": cfg.seed,
               "data": cfg.data.get("name")}
    if cfg.task.name == "distill":
        summary.update(temperature=float(cfg.distill.temperature), alpha=float(cfg.distill.alpha),
                       terms=to_dict(cfg.distill.terms))
    return summary


def check_run_dir(run_dir: Path) -> None:
    """Refuse to write into a folder that already holds a finished run (never overwrite a user's results)."""
    results = read_results(run_dir)
    if results and results.get("status") == "completed":
        raise RunExistsError(f"{run_dir} already holds a finished run ({RESULTS_FILE}); choose another output "
                             f"folder (hydra.run.dir=...) or move that one away")


def run_training(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, validate and test one network as `cfg` says, writing checkpoints, metrics.csv and results.json."""
    run_dir = Path(run_dir).resolve()
    check_run_dir(run_dir)
    validate_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "kdx_version": kdx.__version__, "status": "running", "error": None, "task": cfg.task.name,
        "experiment": cfg.get("run_name"), "run_dir": str(run_dir), "overrides": list(overrides or []),
        "hparams": hparams_summary(cfg), "config_hash": config_hash(to_dict(cfg)),
        "started_at": datetime.now().isoformat(timespec="seconds"),
    }
    write_json(run_dir / RESULTS_FILE, results)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        dm = build_datamodule(cfg.data)
        dm.setup("fit")
        module, params = build_module(cfg, dm)
        trainer, ckpt_cb = build_trainer(cfg, run_dir)
        results.update(params=params, data=dm.describe())
        t0 = time.time()
        trainer.fit(module, datamodule=dm)
        fit_s = time.time() - t0
        val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        t0 = time.time()
        best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
        test_out = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
        test_s = time.time() - t0
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
        if _is_rank_zero():
            write_json(run_dir / RESULTS_FILE, results)
        raise
    results["finished_at"] = datetime.now().isoformat(timespec="seconds")
    if _is_rank_zero():
        write_json(run_dir / RESULTS_FILE, results)
    return results


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
