"""Face teacher vs students, side by side: cost and verification on the held-out identities of the test split.

Rows: the teacher (an ONNX model such as SFace, or a face run's checkpoint), the student trained alone
and the distilled student. Each is scored with the insightface protocol (image + flipped-image
embeddings, 10-fold accuracy, AUC, TAR@FAR) on the datamodule's test pairs; cost is parameters, MACs,
weight size, CPU latency at batch 1 and throughput. Writes comparison.md/json/png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from kdx.checkpoints import load_embedding_model, load_face_checkpoint
from kdx.configs import build_datamodule, to_dict
from kdx.distill.settings import split_distill_section
from kdx.distill.teachers import build_face_teacher
from kdx.errors import ConfigError
from kdx.eval.compare import STAGE_LABELS, print_table, write_comparison
from kdx.eval.embeddings import embed_dataset
from kdx.eval.profile import forward_runner, static_cost, time_models
from kdx.metrics.verification import far_key, verification_metrics
from kdx.models.embedding import model_input_size
from kdx.models.onnx_teacher import OnnxEmbeddingModel, onnx_parameter_count
from kdx.tasks import task_class


def face_columns(throughput_batch: int, far_targets: Sequence[float]) -> dict[str, tuple[str, str]]:
    """Column key -> (header, format) of the face comparison table."""
    cols = {
        "model": ("model", "{}"), "architecture": ("architecture", "{}"), "input": ("input", "{}"),
        "embedding_size": ("emb. dim", "{}"), "params": ("params", "{:,}"), "macs": ("MACs", "{:,}"),
        "size_mb": ("size (MB)", "{:.2f}"), "latency_ms": ("latency b=1 (ms)", "{:.2f}"),
        "images_per_s": (f"images/s b={throughput_batch}", "{:,.0f}"),
        "verif_acc": ("verif. acc", "{:.4f}"), "verif_acc_std": ("± std", "{:.4f}"), "auc": ("AUC", "{:.4f}"),
    }
    for far in far_targets:
        cols[far_key(far)] = (far_key(far).replace("tar@far", "TAR@FAR"), "{:.4f}")
    return cols


def cost_runners(model: nn.Module, in_chans: int, throughput_batch: int):
    """(static cost dict, batch-1 runner, batch runner, input size) of a face model, torch or ONNX."""
    if isinstance(model, OnnxEmbeddingModel):
        c = model.model_channels or 3
        size = model.input_size or (112, 112)
        x1, xb = torch.zeros(1, c, *size), torch.zeros(throughput_batch, c, *size)
        static = {"params": onnx_parameter_count(model.path), "macs": None,
                  "size_mb": model.path.stat().st_size / 2**20}
        return static, (lambda: model(x1)), (lambda: model(xb)), size
    size = model_input_size(model) or (112, 112)
    shape = (in_chans, *size)
    return (static_cost(model, shape), forward_runner(model, shape, 1), forward_runner(model, shape, throughput_batch),
            size)


def score_model(label: str, architecture: str, model: nn.Module, dataset, opts: dict[str, Any],
                far_targets: Sequence[float]) -> dict[str, Any]:
    """One comparison row without its cost: verification metrics of `model` on the pairs of `dataset`."""

    flip = bool(opts.get("flip", True))
    emb, flipped, issame = embed_dataset(model, dataset, batch_size=int(opts.get("batch_size", 64)), flip=flip)
    m = verification_metrics(emb, issame, flipped, nrof_folds=int(opts.get("nrof_folds", 10)), far_targets=far_targets)
    row = {"model": label, "architecture": architecture, "embedding_size": int(emb.shape[1]),
           "verif_acc": m["accuracy"], "verif_acc_std": m["accuracy_std"], "auc": m["auc"],
           "threshold": m["best_threshold"]}
    row.update({far_key(f): m.get(far_key(f)) for f in far_targets})
    return row


def add_costs(rows: list[dict[str, Any]], models: Sequence[tuple[str, str, nn.Module]], in_chans: int,
              opts: dict[str, Any]) -> None:
    """Add params, MACs, size and interleaved latency/throughput timings (see kdx.eval.profile) to the rows."""
    throughput_batch = int(opts.get("throughput_batch", 64))
    latency, batch = {}, {}
    for row, (label, _, model) in zip(rows, models):
        static, one, many, size = cost_runners(model, in_chans, throughput_batch)
        row.update(static, input=f"{size[0]}x{size[1]}")
        latency[label], batch[label] = one, many
    timings = time_models(latency, batch, throughput_batch, latency_runs=int(opts.get("latency_runs", 30)),
                          throughput_runs=int(opts.get("throughput_runs", 5)), threads=opts.get("threads"))
    for row, (label, _, _) in zip(rows, models):
        row.update(timings[label])


def _is_face(stage_cfg: DictConfig) -> bool:
    """True when a stage trains a face task (an embedding network scored by verification)."""
    return task_class(stage_cfg.task.name).kind == "face"


def _teacher_of(stages: dict[str, dict], stage_cfgs: dict[str, DictConfig], teacher_stage: str | None):
    """(label, architecture, frozen teacher network) from the teacher stage's checkpoint or a distill stage's teacher."""
    if teacher_stage and teacher_stage in stages:
        ckpt = (stages[teacher_stage].get("checkpoints") or {}).get("best")
        if ckpt:
            scfg = stage_cfgs.get(teacher_stage)
            given = to_dict(scfg[scfg.task.network]).get("name") if scfg is not None else None
            net, _, meta = load_face_checkpoint(ckpt, given)
            return STAGE_LABELS.get(teacher_stage, teacher_stage), meta["embedding_model"]["name"], net
    for name, scfg in stage_cfgs.items():
        if _is_face(scfg) and task_class(scfg.task.name).distills:
            spec = to_dict(scfg.teacher)
            teacher = build_face_teacher(spec, data_mean=scfg.data.get("mean", 0.5), data_std=scfg.data.get("std", 0.5))
            arch = spec.get("name") or Path(teacher.source).stem
            if teacher.is_onnx:
                arch = f"{arch} (ONNX)"
            return "teacher (given)", arch, teacher.net
    return None


def compare_face(cfg: DictConfig, run_dir: Path, stages: dict[str, dict], stage_cfgs: dict[str, DictConfig]):
    """Score the teacher and every face stage's best checkpoint on the test pairs; write the comparison files."""

    if not stage_cfgs:
        raise ConfigError("pipeline.stages is empty; nothing to compare")
    first = next(iter(stage_cfgs.values()))
    dm = build_datamodule(first.data)
    dm.setup("test")
    dataset = dm.test_set
    in_chans = int(dm.in_chans)
    opts = to_dict(cfg.pipeline.get("compare") or {})
    far_targets = tuple(float(f) for f in (opts.get("far_targets") or (1e-1, 1e-2, 1e-3)))
    teacher_stage = cfg.pipeline.get("teacher_stage")
    models: list[tuple[str, str, nn.Module]] = []
    teacher = _teacher_of(stages, stage_cfgs, teacher_stage)
    if teacher is not None:
        models.append(teacher)
    for name, result in stages.items():
        if name == teacher_stage:
            continue
        ckpt = (result.get("checkpoints") or {}).get("best")
        scfg = stage_cfgs.get(name)
        if not ckpt or scfg is None or not _is_face(scfg):
            continue
        spec = to_dict(scfg[scfg.task.network])
        models.append((STAGE_LABELS.get(name, name), spec.get("name"), load_embedding_model(ckpt, spec.get("name"))))
    rows = []
    for label, arch, net in models:
        print(f"[kdx] comparison: scoring {label} ({arch})", flush=True)
        rows.append(score_model(label, arch, net, dataset, opts, far_targets))
    print(f"[kdx] comparison: timing the {len(models)} models, interleaved", flush=True)
    add_costs(rows, models, in_chans, opts)
    n_pairs = len(dataset.issame)
    info = dm.describe()
    title = (f"{cfg.get('run_name')}: face verification on {n_pairs} test pairs of "
             f"{info.get('identities_test') or info.get('identities_held_out', '?')} held-out identities")
    extra = {
        "data": first.data.get("name"),
        "protocol": "insightface: embedding of image + flipped image, L2-normalised, 10-fold accuracy (mean ± std), "
                    "AUC and TAR@FAR over all test pairs" if opts.get("flip", True) else
                    "insightface 10-fold protocol without flipped images",
        "identities": f"{info.get('identities_train')} training, {info.get('identities_held_out')} validation"
                      + (f", {info['identities_test']} test" if info.get("identities_test") else " (test = validation pairs)"),
        "latency": "CPU, eval mode, batch 1 at each model's own input size (ONNX: onnxruntime, including its "
                   "preprocessing): median over rounds in which the models take turns, interquartile range in "
                   "brackets",
        "params/MACs of ONNX models": "params = stored values of all initializers (int8 weights and their scales "
                                      "for SFace); MACs are not measured for ONNX models",
    }
    kd = next((c for c in stage_cfgs.values() if _is_face(c) and task_class(c.task.name).distills), None)
    if kd is not None:
        distill = to_dict(kd.distill)
        extra.update(distill_method=distill.get("method"), distill_mix=sorted(distill.get("mix") or {}),
                     alpha=split_distill_section(distill, "face")[0].alpha)
    columns = face_columns(int(opts.get("throughput_batch", 64)), far_targets)
    paths = write_comparison(rows, run_dir, title, extra, columns=columns, metric="verif_acc",
                             metric_label="verification accuracy")
    print_table(rows, title, columns)
    print(f"[kdx] comparison written to {paths['md']}, {paths['json']} and {paths['png']}", flush=True)
    return {"rows": rows, "files": {k: str(v) for k, v in paths.items()}}
