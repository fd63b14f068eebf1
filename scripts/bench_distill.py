#!/usr/bin/env python
"""Throughput of kdx's distillation training step against a hand-written PyTorch loop doing the same math.

Both sides train the same student from the same frozen teacher on the same pre-made batches:
loss = alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE, SGD with Nesterov momentum and weight
decay, a per-step LR schedule. kdx runs its real DistillationModule under a real pl.Trainer (logging on);
the reference loop is plain PyTorch. On a GPU both use bf16 autocast and channels_last.

    python scripts/bench_distill.py                 # CPU (and the GPU too when one is present)
    python scripts/bench_distill.py --device cpu --steps 40 --batch-size 128
Prints a table: images/s of each (medians of interleaved repeats), the ratio kdx / loop (target >= 0.9 on the
CPU, >= 0.95 on a GPU), and peak memory. On a GPU the default pair is ResNet-34 -> ResNet-18 at 224 px, batch 256,
bf16 + channels_last, data resident on the GPU.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kdx.lit import DistillationModule
from kdx.lit.optim import lr_factor
from kdx.models import build_model, get_classifier

TEMPERATURE, ALPHA = 4.0, 0.9
OPTIM = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine"}


class PremadeBatches(Dataset):
    """A dataset whose items are whole batches (the DataLoader runs with batch_size=None)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class StepTimer(pl.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self, warmup: int, sync):
        self.warmup, self.sync, self.t0, self.t1 = warmup, sync, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.warmup - 1:
            self.sync()
            self.t0 = time.perf_counter()
        self.sync()
        self.t1 = time.perf_counter()


def make_batches(steps, batch_size, classes, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, size, size, generator=g), torch.randint(0, classes, (batch_size,), generator=g))
            for _ in range(steps)]


def peak_memory(device) -> float:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _num_classes(model) -> int:
    return get_classifier(model).out_features


def run_kdx(teacher, student, batches, device, warmup, amp, channels_last=None, compile=False):
    """kdx's step: `amp` bf16 autocast, `channels_last` NHWC (default: with amp), `compile` torch.compile of the
    networks (kdx's trainer.compile)."""
    channels_last = amp if channels_last is None else channels_last
    module = DistillationModule(student, teacher, num_classes=_num_classes(teacher),
                                distill={"method": "kd", "temperature": TEMPERATURE}, alpha=ALPHA, optim=OPTIM,
                                example_input=batches[0][0][:2].cpu())
    module.channels_last = channels_last
    module.compile_networks = compile
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timer = StepTimer(warmup, sync)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1,
                         precision="bf16-mixed" if amp else "32-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=50)
    loader = DataLoader(PremadeBatches(batches), batch_size=None, shuffle=False, pin_memory=device.type == "cuda")
    trainer.fit(module, train_dataloaders=loader)
    return (len(batches) - warmup) * batches[0][0].shape[0] / (timer.t1 - timer.t0)


def run_loop(teacher, student, batches, device, warmup, amp, channels_last=None, compile=False):
    """The same step written by hand, with the same `amp`, `channels_last` and `compile` settings."""
    channels_last = amp if channels_last is None else channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    teacher, student = teacher.to(device, memory_format=memory_format).eval(), student.to(device, memory_format=memory_format).train()
    if compile:
        teacher.compile()
        student.compile()
    opt = torch.optim.SGD(student.parameters(), lr=OPTIM["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, len(batches)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = None
    for i, (x, y) in enumerate(batches):
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            T = TEMPERATURE
            kd = F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1), log_target=True,
                          reduction="batchmean") * T * T
            loss = ALPHA * kd + (1 - ALPHA) * F.cross_entropy(s, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i == warmup - 1:
            sync()
            t0 = time.perf_counter()
    sync()
    return (len(batches) - warmup) * batches[0][0].shape[0] / (time.perf_counter() - t0)


def bench(device_name, args):
    device = torch.device(device_name)
    amp = device.type == "cuda"
    teacher_name, student_name = (args.teacher, args.student) if not amp else (args.gpu_teacher, args.gpu_student)
    batch = args.batch_size if not amp else args.gpu_batch_size
    steps = args.steps if not amp else args.gpu_steps
    torch.manual_seed(0)
    teacher = build_model(teacher_name, args.classes)
    student = build_model(student_name, args.classes)
    size = args.image_size if not amp else args.gpu_image_size
    batches = make_batches(steps, batch, args.classes, size)
    if amp:  # resident on the GPU, as data.on_device keeps an in-memory dataset
        batches = [(x.to(device), y.to(device)) for x, y in batches]
    rows = []
    for repeat in range(args.repeats):
        for name, fn in (("kdx", run_kdx), ("loop", run_loop)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rate = fn(copy.deepcopy(teacher), copy.deepcopy(student), batches, device, args.warmup, amp)
            rows.append((repeat, name, rate, peak_memory(device)))
    # medians of the interleaved repeats; the ratio is the median of per-repeat ratios (same machine state)
    best = {name: statistics.median(r[2] for r in rows if r[1] == name) for name in ("kdx", "loop")}
    mem = {name: max(r[3] for r in rows if r[1] == name) for name in ("kdx", "loop")}
    ratios = [k[2] / lp[2] for k, lp in zip(rows[0::2], rows[1::2])]
    return {"device": torch.cuda.get_device_name(device) if amp else f"CPU x{torch.get_num_threads()} threads",
            "setting": f"{teacher_name} -> {student_name}, {size}px, batch {batch}, "
                       f"{'bf16 + channels_last' if amp else 'fp32'}",
            "kdx": best["kdx"], "loop": best["loop"], "ratio": statistics.median(ratios),
            "mem_kdx": mem["kdx"], "mem_loop": mem["loop"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--gpu-teacher", default="tv:resnet34")
    parser.add_argument("--gpu-student", default="tv:resnet18")
    parser.add_argument("--gpu-image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gpu-batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--gpu-steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved kdx/loop runs; medians are reported")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results = [bench(d, args) for d in devices]
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kdx distillation step vs hand-written PyTorch loop (images/s, higher is better)")
    for col in ("device", "setting", "kdx img/s", "loop img/s", "ratio kdx/loop", "peak MiB kdx", "peak MiB loop"):
        table.add_column(col, justify="right" if "img" in col or "ratio" in col or "MiB" in col else "left")
    for r in results:
        table.add_row(r["device"], r["setting"], f"{r['kdx']:,.0f}", f"{r['loop']:,.0f}", f"{r['ratio']:.3f}",
                      f"{r['mem_kdx']:,.0f}", f"{r['mem_loop']:,.0f}")
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
