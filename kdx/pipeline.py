"""teacher -> student alone -> student distilled -> comparison, each stage a kdx-train run in one folder.

A stage whose folder already holds a finished run with the same config is reused (a finished teacher
is never retrained); one with a different config is an error, never overwritten.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from kdx.checkpoints import load_network
from kdx.configs import build_datamodule, to_dict
from kdx.distill.settings import split_distill_section
from kdx.errors import ConfigError, RunExistsError
from kdx.eval import compare_classifiers, print_table, write_comparison
from kdx.eval.compare import STAGE_LABELS
from kdx.eval.compare_face import compare_face
from kdx.eval.profile import torch_vs_onnx_latency
from kdx.eval.robustness import pixel_space_of
from kdx.export import export_network
from kdx.io import read_results, write_json
from kdx.progress import format_duration
from kdx.ranks import is_global_zero_process, launch_rank
from kdx.runs import LAST_CKPT, set_aside
from kdx.train import run_config_hash, run_training

FORWARD_EXCLUDE = ("pipeline.", "experiment=", "hydra.", "run_name=")


def forwarded_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's overrides that every stage receives (all but experiment=, pipeline.*, hydra.*)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(FORWARD_EXCLUDE)]


def run_pipeline(cfg: DictConfig, run_dir: str | Path, user_overrides: Sequence[str],
                 compose: Callable[[list[str]], DictConfig], compare: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run every stage of `cfg.pipeline` (composing each with `compose(overrides)`), then the comparison."""
    pipe = cfg.get("pipeline")
    if not pipe or not pipe.get("stages"):
        raise ConfigError("pipeline.stages is empty; pick a pipeline experiment, e.g. kdx-pipeline experiment=fmnist")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher_stage = pipe.get("teacher_stage", "teacher")
    distill_stages = set(pipe.get("distill_stages") or [])
    teacher_ckpt = pipe.get("teacher_ckpt")
    if teacher_ckpt and not Path(teacher_ckpt).is_file():
        raise ConfigError(f"pipeline.teacher_ckpt {teacher_ckpt} does not exist; pass a finished teacher's checkpoint")
    forwarded = forwarded_overrides(user_overrides)
    stages: dict[str, dict[str, Any]] = {}
    stage_cfgs: dict[str, DictConfig] = {}
    started, total = time.monotonic(), len(pipe.stages)
    for number, (name, stage_overrides) in enumerate(pipe.stages.items(), 1):
        label = f"stage {number}/{total} {name}"
        overrides = [*stage_overrides, *forwarded]
        if name == teacher_stage and teacher_ckpt:
            stages[name] = {"status": "given", "checkpoints": {"best": str(Path(teacher_ckpt).resolve())}}
            stage_cfgs[name] = compose(overrides)
            continue
        if name in distill_stages or (name != teacher_stage and teacher_ckpt and "task=probe" in overrides):
            if not teacher_ckpt:
                raise ConfigError(f"pipeline stage {name!r} needs the teacher, but stage {teacher_stage!r} "
                                  f"comes later or is missing; list the teacher stage first")
            overrides.append(f"teacher.ckpt={teacher_ckpt}")
        stage_cfg = compose(overrides)
        stage_cfgs[name] = stage_cfg
        stage_dir = run_dir / name
        previous = read_results(stage_dir)
        if previous and previous.get("status") == "completed":
            if previous.get("config_hash") != run_config_hash(stage_cfg):
                raise RunExistsError(f"{stage_dir} holds a finished {name} run made with a different config; "
                                     f"use another folder (hydra.run.dir=...) or move it away")
            print(f"[kdx] {label}: reusing the finished run in {stage_dir}", flush=True)
            result = previous
        else:
            resumable = (previous is not None and previous.get("config_hash") == run_config_hash(stage_cfg)
                         and (stage_dir / LAST_CKPT).is_file())
            if resumable:  # an interrupted stage with the same config continues from its last finished epoch
                print(f"[kdx] {label}: resuming the interrupted run in {stage_dir}", flush=True)
                stage_cfg = stage_cfgs[name] = compose([*overrides, f"resume={stage_dir}"])
            else:
                if stage_dir.exists():
                    print(f"[kdx] {label}: unfinished run moved to {set_aside(stage_dir, 'incomplete', keep=())}",
                          flush=True)
                print(f"[kdx] {label}: training ({' '.join(overrides)})", flush=True)
            stage_start = time.monotonic()
            result = run_training(stage_cfg, stage_dir, overrides)
            print(f"[kdx] {label}: finished in {format_duration(time.monotonic() - stage_start)} "
                  f"(pipeline so far {format_duration(time.monotonic() - started)})", flush=True)
        stages[name] = result
        if name == teacher_stage:
            teacher_ckpt = result["checkpoints"]["best"] or result["checkpoints"]["last"]
    summary = {"run_dir": str(run_dir), "stages": {k: {"status": v.get("status"), "metrics": v.get("metrics"),
                                                       "checkpoint": (v.get("checkpoints") or {}).get("best")}
                                                   for k, v in stages.items()}}
    if not is_global_zero_process():  # torchrun/srun: every rank trained the stages; one compares and writes
        print(f"[kdx] rank {launch_rank()}: stages finished; rank 0 writes the comparison and pipeline.json",
              flush=True)
        return summary
    if compare is not None:
        summary["comparison"] = compare(cfg, run_dir, stages, stage_cfgs)
    write_json(run_dir / "pipeline.json", summary)
    return summary



def compare_classification(cfg: DictConfig, run_dir: Path, stages: dict[str, dict], stage_cfgs: dict[str, DictConfig]):
    """Load each stage's best checkpoint and write the comparison table on the test set."""
    first = next(iter(stage_cfgs.values()))
    dm = build_datamodule(first.data)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    models = []
    for name, result in stages.items():
        ckpt = (result.get("checkpoints") or {}).get("best")
        if not ckpt:
            continue
        scfg = stage_cfgs.get(name)
        given = (scfg.get(scfg.task.get("network", "student")) or {}).get("name") if scfg is not None else None
        net, meta = load_network(ckpt, model_name=given)
        models.append((STAGE_LABELS.get(name, name), meta["model_name"], net))
    opts = to_dict(cfg.pipeline.get("compare") or {})
    robust = opts.get("robustness") or {}
    robustness = None
    if robust.get("enabled"):
        robustness = {"space": pixel_space_of(dm), "eps": float(robust.get("eps", 2 / 255)),
                      "pgd_steps": int(robust.get("pgd_steps", 10)),
                      "corruptions": list(robust.get("corruptions", ["noise", "blur"])),
                      "max_images": robust.get("max_images", 1000), "seed": int(cfg.get("seed", 0))}
    rows = compare_classifiers(models, batches, (dm.in_chans, dm.image_size, dm.image_size),
                               reference=models[0][0], robustness=robustness,
                               latency_runs=int(opts.get("latency_runs", 30)),
                               throughput_batch=int(opts.get("throughput_batch", 64)),
                               throughput_runs=int(opts.get("throughput_runs", 5)), threads=opts.get("threads"))
    if opts.get("export_onnx"):
        export_student_onnx(run_dir, stages, models, rows, (dm.in_chans, dm.image_size, dm.image_size),
                            opts.get("threads"))
    title = f"{cfg.get('run_name')}: teacher vs student on the test set ({sum(len(b[1]) for b in batches)} images)"
    extra = {"data": first.data.get("name"),
             "latency": "CPU, eval mode, batch 1: median over rounds in which the models take turns (interleaved), "
                        "interquartile range in brackets"}
    kd = stage_cfgs.get("kd")
    if kd is not None and kd.task.name == "distill":
        distill = kd.distill
        extra.update(method=distill.get("method"), alpha=split_distill_section(distill, "classification")[0].alpha)
        if distill.get("temperature") is not None:
            extra["temperature"] = float(distill.temperature)
    paths = write_comparison(rows, run_dir, title, extra)
    print_table(rows, title)
    print(f"[kdx] comparison written to {', '.join(str(p) for p in paths.values())}", flush=True)
    return {"rows": rows, "files": {k: str(v) for k, v in paths.items()}}


def export_student_onnx(run_dir: Path, stages: dict[str, dict], models: list, rows: list[dict[str, Any]],
                        input_shape: Sequence[int], threads: Any = 1) -> Path | None:
    """pipeline.compare.export_onnx: write the distilled student to <run>/student_distilled.onnx (checked against
    PyTorch by kdx.export, which fails above its tolerance), and add its onnxruntime batch-1 latency, timed in
    rounds interleaved with PyTorch's, to the distilled row. The file is derived from the kd checkpoint and
    rewritten with it."""
    distilled = [(name, result) for name, result in stages.items() if STAGE_LABELS.get(name) == "student distilled"]
    if not distilled or not (distilled[0][1].get("checkpoints") or {}).get("best"):
        return None
    name, result = distilled[0]
    out = run_dir / "student_distilled.onnx"
    report = export_network(result["checkpoints"]["best"], out, format="onnx", overwrite=True,
                            log=lambda m: print(f"[kdx] export: {m}", flush=True))
    net = next(net for label, _, net in models if label == "student distilled")
    row = next(r for r in rows if r["model"] == "student distilled")
    timing = torch_vs_onnx_latency(net, str(out), input_shape, threads=int(threads) if threads else None)
    row.update(onnx_file=str(out), onnx_max_abs_diff=report["max_abs_diff"],
               onnx_latency_ms=timing["onnx_latency_ms"], onnx_latency_q1_ms=timing["onnx_latency_q1_ms"],
               onnx_latency_q3_ms=timing["onnx_latency_q3_ms"], torch_latency_paired_ms=timing["torch_latency_ms"])
    print(f"[kdx] exported the distilled student to {out} (max |torch - onnx| = {report['max_abs_diff']:.2g}); "
          f"batch-1 latency: PyTorch {timing['torch_latency_ms']:.2f} ms, onnxruntime "
          f"{timing['onnx_latency_ms']:.2f} ms (interleaved)", flush=True)
    return out


def compare_stages(cfg: DictConfig, run_dir: Path, stages: dict[str, dict], stage_cfgs: dict[str, DictConfig]):
    """The comparison of `pipeline.compare.kind`: classification (default) or face verification."""
    kind = (cfg.pipeline.get("compare") or {}).get("kind", "classification")
    if kind == "face":
        return compare_face(cfg, run_dir, stages, stage_cfgs)
    if kind != "classification":
        raise ConfigError(f"pipeline.compare.kind must be classification or face, got {kind!r}")
    return compare_classification(cfg, run_dir, stages, stage_cfgs)
