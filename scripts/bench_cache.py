#!/usr/bin/env python
"""What the teacher cache saves: KD epochs and a T x alpha sweep, with and without it, in one run.

Every number comes from real kdx runs (kdx.train.run_training, the code kdx-train runs) on Fashion-MNIST with
the demo's pair (resnet20 -> cnn_tiny), and optionally a heavier teacher. Per teacher it measures
  - images/s of a student-alone epoch, a KD epoch without the cache, and a KD epoch with a warm cache (a second
    job reading the store the first one wrote), as medians of interleaved repeats;
  - the wall time of a 6-job temperature x alpha sweep (2 epochs each) without and with one shared disk store,
    and the ideal speedup (t_teacher + t_student) / (t_teacher / 6 + t_student) from the same run's epochs;
  - consistent teaching at cache speed: images/s of the student alone on mixed batches (data.mix.mode=both) and
    of consistent KD (function matching on the same mixed batches) from a warm store, interleaved.

    python scripts/bench_cache.py                        # about 6-10 min on 2 CPU cores
    python scripts/bench_cache.py --train-subset 5000 --repeats 1 --teachers resnet20

It ends with three lines: `cache ratio: X` (warm-cache KD / student alone, first teacher),
`consistent cache ratio: W` (warm-cache consistent KD / student alone on the same mixed batches) and
`sweep speedup: Y (ideal Z)` (6 jobs without / with the shared store, first teacher).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

import kdx.runs  # noqa: E402,F401  (registers the run-folder resolver)
from kdx.train import run_training  # noqa: E402

GRID = [(t, a) for t in (1.0, 4.0, 8.0) for a in (0.5, 0.9)]


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def epoch_rate(results: dict, images: int) -> float:
    """Training images per second of one run: its training loops alone (no set-up, no validation)."""
    loops = results["time"].get("train_epoch_s") or [results["time"]["fit_s"]]
    return images * len(loops) / float(sum(loops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--student", default="cnn_tiny")
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="fmnist", help="fmnist, or synthetic for a quick check")
    parser.add_argument("--sweep-epochs", type=int, default=2, help="epochs of each sweep job (the demo's KD runs 2)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="kdx-bench-cache-"))
    rows, lines = [], []
    try:
        for teacher_name in args.teachers:
            rows.append(bench_pair(teacher_name, args, work / teacher_name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Teacher cache on the CPU (images/s of training; medians of interleaved repeats)")
    for col in ("pair", "student alone", "KD, no cache", "KD, warm cache", "warm / student", "6-job sweep s, no cache",
                "with shared cache", "speedup", "ideal", "student, mixed", "consistent KD, warm", "warm / student"):
        table.add_column(col, justify="left" if col == "pair" else "right")
    for r in rows:
        table.add_row(r["pair"], f"{r['student']:,.0f}", f"{r['kd']:,.0f}", f"{r['warm']:,.0f}", f"{r['ratio']:.2f}",
                      f"{r['sweep_plain']:.0f}", f"{r['sweep_cached']:.0f}", f"{r['speedup']:.2f}x",
                      f"{r['ideal']:.2f}x", f"{r['mixed_student']:,.0f}", f"{r['consistent_warm']:,.0f}",
                      f"{r['consistent_ratio']:.2f}")
    Console(width=160).print(table)
    first = rows[0]
    print(f"cache ratio: {first['ratio']:.2f}")
    print(f"consistent cache ratio: {first['consistent_ratio']:.2f}")
    print(f"sweep speedup: {first['speedup']:.2f} (ideal {first['ideal']:.2f})")


def bench_pair(teacher_name: str, args, work: Path) -> dict:
    data = ["data=fmnist", f"data.train_subset={args.train_subset}", "data.val_size=1000", "data.test_subset=1000",
            "data.num_workers=0"] if args.data == "fmnist" else \
        ["data=synthetic", f"data.train_size={args.train_subset}", "data.val_size=256", "data.test_size=256"]
    common = [*data, "trainer.progress_bar=none", "trainer.max_epochs=1", "logger=csv", "checkpoint.save_top_k=0",
              "checkpoint.save_last=false", f"teacher.name={teacher_name}", f"student.name={args.student}"]
    in_chans = 1 if args.data == "fmnist" else 3
    teacher_run = run_training(compose_run(["task=supervised", "task.network=teacher", *common,
                                            "checkpoint.save_top_k=1", "+trainer.limit_train_batches=2"]),
                               work / "teacher")
    ckpt = teacher_run["checkpoints"]["best"]  # the weights do not matter for speed, only the architecture
    images = args.train_subset
    kd = ["task=distill", "distill=kd", f"teacher.ckpt={ckpt}", *common]
    store = work / "store"
    run_training(compose_run([*kd, "distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={store}"]),
                 work / "cold")  # fills the store for the warm runs below
    rates: dict[str, list[float]] = {"student": [], "kd": [], "warm": []}
    for r in range(args.repeats):
        student = run_training(compose_run(["task=supervised", "task.network=student", *common]), work / f"s{r}")
        rates["student"].append(epoch_rate(student, images))
        plain = run_training(compose_run([*kd, "distill.temperature=2"]), work / f"kd{r}")
        rates["kd"].append(epoch_rate(plain, images))
        warm = run_training(compose_run([*kd, "distill.temperature=2", "distill.teacher_cache.mode=disk",
                                         f"distill.teacher_cache.dir={store}"]), work / f"warm{r}")
        rates["warm"].append(epoch_rate(warm, images))
    # consistent teaching: every image mixed, teacher outputs of the mixed views from a warm store
    mixed = ["data.mix.mode=both"]
    consistent = ["task=distill", "distill=function_matching", f"teacher.ckpt={ckpt}", *common, *mixed,
                  "distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={work / 'mixed_store'}"]
    run_training(compose_run(consistent), work / "mixed_cold")
    rates.update(mixed_student=[], consistent_warm=[])
    for r in range(args.repeats):
        student = run_training(compose_run(["task=supervised", "task.network=student", *common, *mixed]),
                               work / f"ms{r}")
        rates["mixed_student"].append(epoch_rate(student, images))
        warm = run_training(compose_run(consistent), work / f"cwarm{r}")
        rates["consistent_warm"].append(epoch_rate(warm, images))
    med = {k: statistics.median(v) for k, v in rates.items()}
    t_student, t_kd = images / med["student"], images / med["kd"]
    t_teacher = max(t_kd - t_student, 0.0)
    ideal = (t_teacher + t_student) / (t_teacher / len(GRID) + t_student)

    def sweep(cached: bool) -> float:
        folder = work / ("sweep_cached" if cached else "sweep_plain")
        extra = ["distill.teacher_cache.mode=disk", f"distill.teacher_cache.dir={folder / 'store'}"] if cached else []
        t0 = time.perf_counter()
        for n, (temperature, alpha) in enumerate(GRID):
            run_training(compose_run([*kd, f"distill.temperature={temperature}", f"distill.alpha={alpha}", *extra,
                                      f"trainer.max_epochs={args.sweep_epochs}"]), folder / str(n))
        return time.perf_counter() - t0

    sweep_plain, sweep_cached = sweep(False), sweep(True)
    return {"pair": f"{teacher_name} -> {args.student}, {images} images, {in_chans}-channel",
            "student": med["student"], "kd": med["kd"], "warm": med["warm"], "ratio": med["warm"] / med["student"],
            "sweep_plain": sweep_plain, "sweep_cached": sweep_cached, "speedup": sweep_plain / sweep_cached,
            "ideal": ideal, "mixed_student": med["mixed_student"], "consistent_warm": med["consistent_warm"],
            "consistent_ratio": med["consistent_warm"] / med["mixed_student"]}


if __name__ == "__main__":
    main()
