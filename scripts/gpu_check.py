#!/usr/bin/env python
"""The GPU check behind scripts/gpu_check.sh: one table of what a CUDA machine does with kdx, in under 8 minutes.

Rows:
  - the KD training step (ResNet-34 -> ResNet-18, 224 px) at fp32, bf16, bf16 + channels_last and bf16 +
    channels_last + torch.compile: kdx's real DistillationModule under pl.Trainer against a hand-written PyTorch
    loop doing the same math with the same settings (scripts/bench_distill.py), images/s, the ratio kdx / loop
    and peak GPU memory;
  - the teacher cache on the GPU: images/s of the student alone, of KD without the cache and of KD from a warm
    store (real kdx runs, as scripts/bench_cache.py measures them on the CPU), and warm / student;
  - a 2-process DDP run of kdx-train (on 2 GPUs when there are, else 2 gloo processes beside the one GPU), with
    its wall time and result.
Each part has a time budget; a part that does not fit is reported as skipped, never left hanging.

    python scripts/gpu_check.py            # normally through scripts/gpu_check.sh
    python scripts/gpu_check.py --quick    # smaller settings (about 2 minutes)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SETTINGS = [  # (name, bf16 autocast, channels_last, torch.compile)
    ("fp32", False, False, False),
    ("bf16", True, False, False),
    ("bf16 + channels_last", True, True, False),
    ("bf16 + channels_last + compile", True, True, True),
]


def kd_step_rows(args, deadline: float) -> list[dict]:
    from bench_distill import make_batches, run_kdx, run_loop
    from kdx.models import build_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    teacher, student = build_model(args.teacher, args.classes), build_model(args.student, args.classes)
    batches = [(x.to(device), y.to(device)) for x, y in
               make_batches(args.steps, args.batch_size, args.classes, args.image_size)]
    rows = []
    for name, amp, channels_last, compiled in SETTINGS:
        if time.monotonic() > deadline - (150 if compiled else 30):
            rows.append({"part": "KD step", "setting": name, "note": "skipped: out of time"})
            continue
        rates: dict[str, list[float]] = {"kdx": [], "loop": []}
        peaks: dict[str, float] = {"kdx": 0.0, "loop": 0.0}
        for _ in range(1 if compiled else args.repeats):
            for side, fn in (("kdx", run_kdx), ("loop", run_loop)):
                torch.cuda.reset_peak_memory_stats(device)
                try:
                    rates[side].append(fn(copy.deepcopy(teacher), copy.deepcopy(student), batches, device,
                                          args.warmup, amp, channels_last=channels_last, compile=compiled))
                except Exception as e:  # a compile back-end missing on this machine, say
                    rows.append({"part": "KD step", "setting": name,
                                 "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
                    break
                peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated(device) / 2**20)
            else:
                continue
            break
        if len(rates["kdx"]) and len(rates["kdx"]) == len(rates["loop"]):
            ratio = statistics.median(k / lp for k, lp in zip(rates["kdx"], rates["loop"]))
            rows.append({"part": "KD step", "setting": name, "kdx": statistics.median(rates["kdx"]),
                         "reference": statistics.median(rates["loop"]), "ratio": ratio, "peak_mib": peaks["kdx"],
                         "note": f"loop peak {peaks['loop']:,.0f} MiB"})
    return rows


def cache_rows(args, deadline: float) -> list[dict]:
    from bench_cache import compose_run, epoch_rate
    from kdx.train import run_training

    if time.monotonic() > deadline - 60:
        return [{"part": "teacher cache", "setting": "", "note": "skipped: out of time"}]
    images = args.cache_images
    common = ["data=synthetic", f"data.train_size={images}", "data.val_size=256", "data.test_size=256",
              "trainer=gpu", "trainer.progress_bar=none", "trainer.max_epochs=1", "logger=csv",
              "checkpoint.save_top_k=0", "checkpoint.save_last=false", f"teacher.name={args.cache_teacher}",
              "student.name=cnn_tiny"]
    work = Path(tempfile.mkdtemp(prefix="kdx-gpu-check-"))
    teacher = run_training(compose_run(["task=supervised", "task.network=teacher", *common, "checkpoint.save_top_k=1",
                                        "+trainer.limit_train_batches=2"]), work / "teacher")
    kd = ["task=distill", "distill=kd", f"teacher.ckpt={teacher['checkpoints']['best']}", *common]
    cached = ["distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={work / 'store'}"]
    run_training(compose_run([*kd, *cached]), work / "cold")
    rates: dict[str, list[float]] = {"student": [], "kd": [], "warm": []}
    for r in range(args.repeats):
        if time.monotonic() > deadline - 20 and rates["warm"]:
            break
        rates["student"].append(epoch_rate(run_training(compose_run(["task=supervised", "task.network=student",
                                                                    *common]), work / f"s{r}"), images))
        rates["kd"].append(epoch_rate(run_training(compose_run([*kd, "distill.temperature=2"]), work / f"kd{r}"), images))
        rates["warm"].append(epoch_rate(run_training(compose_run([*kd, "distill.temperature=2", *cached]),
                                                     work / f"warm{r}"), images))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return [{"part": "teacher cache", "setting": f"{args.cache_teacher} -> cnn_tiny, {images} images, bf16",
             "kdx": med["warm"], "reference": med["student"], "ratio": med["warm"] / med["student"],
             "note": f"KD without the cache {med['kd']:,.0f} img/s (warm / no cache {med['warm'] / med['kd']:.2f})"}]


def ddp_rows(args, deadline: float) -> list[dict]:
    budget = int(min(args.ddp_timeout, deadline - time.monotonic()))
    if budget < 30:
        return [{"part": "DDP", "setting": "2 processes", "note": "skipped: out of time"}]
    gpus = torch.cuda.device_count()
    accelerator, where = ("gpu", f"2 processes on 2 of {gpus} GPUs (nccl)") if gpus >= 2 else \
        ("cpu", "2 gloo processes on the CPU: one GPU cannot hold 2 nccl ranks")
    run_dir = Path(tempfile.mkdtemp(prefix="kdx-gpu-check-ddp-"))
    kdx_train = Path(sys.executable).parent / "kdx-train"
    cmd = [str(kdx_train) if kdx_train.exists() else "kdx-train", "experiment=synthetic/student", "trainer=ddp",
           "trainer.devices=2", f"trainer.accelerator={accelerator}", "trainer.max_epochs=2", "data.train_size=2048",
           "trainer.progress_bar=none", f"hydra.run.dir={run_dir / 'run'}"]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, cwd=run_dir)
    except subprocess.TimeoutExpired:
        return [{"part": "DDP", "setting": where, "note": f"timed out after {budget} s"}]
    seconds = time.monotonic() - t0
    results = run_dir / "run" / "results.json"
    record = json.loads(results.read_text()) if results.is_file() else {}
    ok = done.returncode == 0 and record.get("status") == "completed"
    tail = (done.stderr.strip().splitlines() or [""])[-1][:100]
    return [{"part": "DDP", "setting": where, "seconds": seconds,
             "note": (f"completed, test/acc1 {record.get('metrics', {}).get('test/acc1', float('nan')):.3f}, "
                      f"global step {record.get('global_step')}") if ok else f"FAILED (exit {done.returncode}): {tail}"}]


def print_table(rows: list[dict], header: str) -> None:
    cols = ("part", "setting", "kdx img/s", "reference img/s", "ratio", "peak MiB", "s", "note")
    lines = [[r.get("part", ""), r.get("setting", ""),
              f"{r['kdx']:,.0f}" if "kdx" in r else "", f"{r['reference']:,.0f}" if "reference" in r else "",
              f"{r['ratio']:.3f}" if "ratio" in r else "", f"{r['peak_mib']:,.0f}" if "peak_mib" in r else "",
              f"{r['seconds']:.0f}" if "seconds" in r else "", r.get("note", "")] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    print(header)
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(v.ljust(w) if i in (0, 1, 7) else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    print("ratio: KD step = kdx / hand-written loop at the same setting (1.0 = no overhead); teacher cache = KD from "
          "a warm store / the student alone (1.0 = the teacher costs nothing)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=450, help="time for the whole check (default 450)")
    parser.add_argument("--quick", action="store_true", help="smaller settings")
    parser.add_argument("--teacher", default="tv:resnet34")
    parser.add_argument("--student", default="tv:resnet18")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-teacher", default="resnet56")
    parser.add_argument("--cache-images", type=int, default=20000)
    parser.add_argument("--ddp-timeout", type=int, default=150)
    parser.add_argument("--json", default=os.environ.get("KDX_GPU_CHECK_JSON"), help="also write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.repeats, args.cache_images = 112, 64, 30, 1, 5000
    start = time.monotonic()
    deadline = start + args.budget_s
    torch.backends.cudnn.benchmark = True
    rows = kd_step_rows(args, deadline - 120)  # keep time for the cache and DDP parts
    rows += cache_rows(args, deadline - 60)
    rows += ddp_rows(args, deadline)
    name = torch.cuda.get_device_name(0)
    print_table(rows, f"kdx GPU check on {torch.cuda.device_count()} x {name}, torch {torch.__version__}, "
                      f"{time.monotonic() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    failed = [r for r in rows if str(r.get("note", "")).startswith(("FAILED", "failed", "timed out"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
