"""Fault soak: kill -9 a small kdx run and a small sweep at random moments, resume them, and check that nothing
was lost, corrupted, redone or changed.

    python scripts/faults.py                      # 12 kill/resume cycles on the run, 6 on the sweep
    python scripts/faults.py --cycles 3 --sweep-cycles 2 --work /tmp/soak      # the short CI version

Each cycle starts `kdx-train` (resuming from the second cycle on) and kills its whole process group with
SIGKILL, as a crash or a scheduler does, in turn: while a checkpoint is being written (the process is told to
pause between writing a checkpoint's temporary file and renaming it, through KDX_FAULT_PAUSE_IN_SAVE, and is
killed in that pause), at a random moment of an epoch, or at start-up. After every kill the script checks that every file is
whole (results.json parses, every checkpoint loads with weights_only=True, metrics.csv parses); at the end it
resumes to completion and checks that the final metrics equal those of an uninterrupted run with the same
seed, that metrics.csv has no duplicate rows and holds only rows of the uninterrupted run, that no temporary
file is left, and that no finished sweep job was trained again.

Two more cycles (each off with --no-full-disk / --no-changed-data):
- full disk: a run whose folder is a real 1.7 MB tmpfs (mounted where the script runs as root; skipped with the
  reason otherwise) fills it in its second epoch; it must stop with one sentence naming the folder and the
  resume command, leave every file whole, and, once the filesystem is grown, resume to the metrics of an
  uninterrupted run;
- changed data: distillation runs with a teacher cache on disk over a folder of images; the images are
  replaced in place (same names, count and file sizes) between runs, and the next run must compute every
  teacher row again (hit rate 0) and end exactly where a run with a fresh store ends.
It prints the counts and exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RUN_ARGS = ["experiment=synthetic/teacher", "trainer.max_epochs=6", "data.train_size=1024", "trainer.deterministic=true",
            "trainer.progress_bar=none", "logger=csv", "trainer.log_every_n_steps=4"]
SWEEP_ARGS = ["experiment=synthetic/teacher", "trainer.max_epochs=3", "data.train_size=768", "trainer.deterministic=true",
              "trainer.progress_bar=none", "logger=csv", "seed=0,1"]


class Soak:
    """Counts and problems of one soak."""

    def __init__(self) -> None:
        self.counts = {"kills": 0, "kills during a checkpoint write": 0, "resumes": 0, "temporaries cleaned": 0,
                       "files checked": 0, "full-disk stops": 0, "changed-data reruns": 0}
        self.problems: list[str] = []
        self.skipped: list[str] = []

    def problem(self, text: str) -> None:
        print(f"  PROBLEM: {text}", flush=True)
        self.problems.append(text)


def env(pause: float | None = None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "KDX_FAULT_PAUSE_IN_SAVE")}
    out.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", CI="1")
    if pause:
        out["KDX_FAULT_PAUSE_IN_SAVE"] = str(pause)
    return out


def run(args: list[str], cwd: Path, log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as f:
        return subprocess.run([str(BIN / "kdx-train"), *args], cwd=cwd, env=env(), stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=900)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp-*") if p.is_file()]


def checkpoint_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.ckpt.tmp-*") if p.is_file()]


def newest_checkpoint_time(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("last.ckpt") if p.is_file()), default=0.0)


def kill_once(args: list[str], cwd: Path, watch: Path, log: Path, soak: Soak, rng: random.Random,
              mode: str) -> bool:
    """Start kdx-train and kill its process group; False if it finished first.

    mode "save": during a checkpoint write (the save pauses between writing the temporary and renaming it);
    "early": 0.3-3 s after the start (before or at the start of training); "epoch": at a random moment of the
    epoch after the next checkpoint, so every kill lands in training whatever the machine's speed.
    """
    with open(log, "a") as f:
        proc = subprocess.Popen([str(BIN / "kdx-train"), *args], cwd=cwd, env=env(1.5 if mode == "save" else None),
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    hit_save = False
    if mode == "early":
        deadline = time.time() + rng.uniform(0.3, 3.0)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    elif mode == "save":
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if checkpoint_temporaries(watch):
                time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the 1.5 s between writing and renaming
                hit_save = bool(checkpoint_temporaries(watch))
                break
            time.sleep(0.02)
    elif mode == "second job":
        deadline = time.time() + 300
        while not (watch / "1" / "results.json").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        deadline = time.time() + rng.uniform(0.2, 2.0)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    else:
        before, deadline = newest_checkpoint_time(watch), time.time() + 300
        while newest_checkpoint_time(watch) <= before and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        deadline = time.time() + rng.uniform(0.0, 1.0)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    soak.counts["kills"] += 1
    soak.counts["kills during a checkpoint write"] += int(hit_save)
    return True


MODES = ("save", "epoch", "early")  # cycle i uses MODES[i % 3]: the first kill always hits a checkpoint write
KILL_WHEN = {"save": "during a checkpoint write", "epoch": "in an epoch", "early": "early, at start-up",
             "second job": "in the second job"}


def check_files(folder: Path, soak: Soak) -> None:
    """Every results.json parses, every checkpoint loads without code, every metrics.csv parses."""
    from kdx.checkpoints import read_checkpoint

    for path in folder.rglob("results.json"):
        soak.counts["files checked"] += 1
        try:
            json.loads(path.read_text())
        except ValueError as e:
            soak.problem(f"{path} does not parse ({e})")
    for path in folder.rglob("*.ckpt"):
        soak.counts["files checked"] += 1
        try:
            read_checkpoint(path)
        except Exception as e:
            soak.problem(f"{path} cannot be read ({e})")
    for path in folder.rglob("metrics.csv"):
        soak.counts["files checked"] += 1
        try:
            text = path.read_text()
            rows = list(csv.reader(text.splitlines()))
            if text and not text.endswith("\n") or any(len(r) != len(rows[0]) for r in rows):
                soak.problem(f"{path} has a cut or ragged row")
        except (OSError, csv.Error) as e:
            soak.problem(f"{path} does not parse ({e})")


def csv_rows(path: Path) -> list[tuple]:
    with open(path, newline="") as f:
        return [tuple(sorted((k, v) for k, v in row.items() if v not in ("", None))) for row in csv.DictReader(f)]


def compare_run(reference: Path, faulted: Path, soak: Soak, label: str) -> None:
    ref = json.loads((reference / "results.json").read_text())
    got = json.loads((faulted / "results.json").read_text())
    if got.get("status") != "completed":
        soak.problem(f"{label}: status {got.get('status')!r}, error {got.get('error')!r}")
        return
    if got["metrics"] != ref["metrics"]:
        soak.problem(f"{label}: final metrics differ from the uninterrupted run: {got['metrics']} vs {ref['metrics']}")
    rows, ref_rows = csv_rows(faulted / "metrics.csv"), set(csv_rows(reference / "metrics.csv"))
    if len(rows) != len(set(rows)):
        soak.problem(f"{label}: metrics.csv has duplicate rows")
    strange = [r for r in rows if r not in ref_rows]
    if strange:
        soak.problem(f"{label}: metrics.csv has {len(strange)} row(s) the uninterrupted run does not: {strange[:2]}")
    left = temporaries(faulted)
    if left:
        soak.problem(f"{label}: temporaries left behind: {left}")


def soak_run(work: Path, cycles: int, rng: random.Random, soak: Soak) -> None:
    print(f"run: uninterrupted reference, then {cycles} kill/resume cycles", flush=True)
    ref = run([*RUN_ARGS, f"hydra.run.dir={work / 'run_ref'}"], work, work / "run_ref.log")
    if ref.returncode:
        soak.problem(f"the reference run failed (see {work / 'run_ref.log'})")
        return
    folder, log = work / "run", work / "run.log"
    args = [*RUN_ARGS, f"hydra.run.dir={folder}"]
    for i in range(cycles):
        started = (folder / "checkpoints" / "last.ckpt").is_file()
        mode = MODES[i % 3]
        killed = kill_once([*args, *([f"resume={folder}"] if started else [])], work, folder, log, soak, rng, mode)
        soak.counts["resumes"] += int(started)
        check_files(folder, soak)
        if not killed:
            print(f"  cycle {i + 1}: finished before the kill", flush=True)
            break
        print(f"  cycle {i + 1}: killed ({KILL_WHEN[mode]})", flush=True)
    if json.loads((folder / "results.json").read_text()).get("status") != "completed":
        resume = [*args, f"resume={folder}"] if (folder / "checkpoints" / "last.ckpt").is_file() else args
        soak.counts["resumes"] += int(resume is not args)
        if run(resume, work, log).returncode:
            soak.problem(f"the last resume failed (see {log})")
    soak.counts["temporaries cleaned"] += log.read_text().count("temporary file(s) a killed run left")
    check_files(folder, soak)
    compare_run(work / "run_ref", folder, soak, "run")


def finished_jobs(sweep: Path) -> dict[str, str]:
    out = {}
    for path in sweep.glob("*/results.json"):
        try:
            results = json.loads(path.read_text())
        except ValueError:
            continue
        if results.get("status") == "completed":
            out[path.parent.name] = results.get("finished_at")
    return out


def soak_sweep(work: Path, cycles: int, rng: random.Random, soak: Soak) -> None:
    print(f"sweep: uninterrupted reference, then {cycles} kill/resume cycles", flush=True)
    ref = run(["-m", *SWEEP_ARGS, f"hydra.sweep.dir={work / 'sweep_ref'}"], work, work / "sweep_ref.log")
    if ref.returncode:
        soak.problem(f"the reference sweep failed (see {work / 'sweep_ref.log'})")
        return
    sweep, log = work / "sweep", work / "sweep.log"
    args = ["-m", *SWEEP_ARGS, f"hydra.sweep.dir={sweep}"]
    done: dict[str, str] = {}
    for i in range(cycles):
        started = sweep.exists()
        mode = "second job" if i == cycles - 1 else MODES[i % 3]  # the last kill comes after a job has finished
        killed = kill_once(args, work, sweep, log, soak, rng, mode)
        soak.counts["resumes"] += int(started)
        check_files(sweep, soak)
        now = finished_jobs(sweep)
        for job, at in done.items():
            if now.get(job) != at:
                soak.problem(f"sweep job {job} was finished but ran again")
        done = now
        if not killed:
            break
        print(f"  cycle {i + 1}: killed ({KILL_WHEN[mode]}); finished jobs: {sorted(done) or 'none'}", flush=True)
    if run(args, work, log).returncode:
        soak.problem(f"the last sweep resume failed (see {log})")
    soak.counts["resumes"] += 1
    for job, at in done.items():
        if finished_jobs(sweep).get(job) != at:
            soak.problem(f"sweep job {job} was finished but ran again")
    soak.counts["temporaries cleaned"] += log.read_text().count("temporary file(s) a killed run left")
    check_files(sweep, soak)
    for job in sorted(p.name for p in (work / "sweep_ref").iterdir() if (p / "results.json").is_file()):
        compare_run(work / "sweep_ref" / job, sweep / job, soak, f"sweep job {job}")


# --------------------------------------------------------------------------- a full disk under the run folder
DISK_ARGS = ["experiment=synthetic/teacher", "trainer.max_epochs=3", "data.train_size=512", "trainer.deterministic=true",
             "trainer.progress_bar=none", "logger=csv"]
DISK_SIZE = "1700k"  # the first epoch's best.ckpt and last.ckpt (~0.65 MB each) fit; the second epoch's do not


def _mount(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `path`; the reason when it cannot be done, else None."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    return None if done.returncode == 0 else f"mount failed: {done.stderr.strip() or done.returncode}"


def soak_full_disk(work: Path, soak: Soak) -> None:
    print(f"full disk: a run on a {DISK_SIZE} tmpfs, stopped by the full disk, then resumed with room", flush=True)
    disk = work / "disk"
    reason = _mount(disk, DISK_SIZE)
    if reason:
        soak.skipped.append(f"full-disk cycle ({reason})")
        print(f"  skipped: {reason}", flush=True)
        return
    try:
        ref = run([*DISK_ARGS, f"hydra.run.dir={work / 'disk_ref'}"], work, work / "disk_ref.log")
        if ref.returncode:
            soak.problem(f"the full-disk reference run failed (see {work / 'disk_ref.log'})")
            return
        folder = disk / "run"
        full = subprocess.run([str(BIN / "kdx-train"), *DISK_ARGS, f"hydra.run.dir={folder}"], cwd=work, env=env(),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
        (work / "disk.log").write_text(full.stdout + full.stderr)
        lines = full.stderr.strip().splitlines()
        if full.returncode != 2 or len(lines) != 1 or "stopped: no space left on the disk holding" not in lines[0]:
            soak.problem(f"a full run folder gave exit {full.returncode} and {len(lines)} line(s) on stderr, not one "
                         f"sentence: {lines[-1][:300] if lines else ''}")
        soak.counts["full-disk stops"] += 1
        check_files(folder, soak)
        left = temporaries(folder)
        if left:
            soak.problem(f"the full disk left temporaries: {left}")
        results = json.loads((folder / "results.json").read_text())
        if results.get("status") != "failed" or "DiskFullError" not in str(results.get("error")):
            soak.problem(f"results.json after the full disk: status {results.get('status')!r}, "
                         f"error {results.get('error')!r}")
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        resume = [*DISK_ARGS, f"resume={folder}"] if (folder / "checkpoints" / "last.ckpt").is_file() else \
            [*DISK_ARGS, f"hydra.run.dir={folder}"]
        soak.counts["resumes"] += int("resume=" in resume[-1])
        if run(resume, work, work / "disk.log").returncode:
            soak.problem(f"the run did not finish once the disk had room (see {work / 'disk.log'})")
            return
        compare_run(work / "disk_ref", folder, soak, "full-disk run")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --------------------------------------------------------------------------- data changed between cached runs
def write_images(root: Path, seed: int) -> None:
    """4 class folders of 8 BMP images, 16 px (a fixed file size: a rewrite changes only pixels and mtimes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(4):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i in range(8):
            base = np.zeros((16, 16, 3), dtype=np.float32)
            base[..., k % 3] = 200.0 if k < 3 else 100.0
            img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class_{k}" / f"img_{i}.bmp", "BMP")


def hit_rate(run_dir: Path) -> float | None:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv", newline="")))
    rates = [float(r["train/teacher_cache_hit_rate"]) for r in rows if r.get("train/teacher_cache_hit_rate")]
    return rates[-1] if rates else None


def soak_changed_data(work: Path, soak: Soak) -> None:
    print("changed data: cached distillation runs, the images replaced in place between them", flush=True)
    images, log = work / "images", work / "data.log"
    write_images(images, seed=0)
    data = ["data=image_folder", f"data.root={images}", "data.image_size=16", "data.num_workers=0",
            "data.batch_size=8", "trainer.max_epochs=1", "trainer.deterministic=true", "trainer.progress_bar=none",
            "logger=csv"]
    if run(["experiment=synthetic/teacher", *data, f"hydra.run.dir={work / 'data_teacher'}"], work, log).returncode:
        soak.problem(f"the changed-data teacher run failed (see {log})")
        return
    teacher = work / "data_teacher" / "checkpoints" / "best.ckpt"
    cached = ["experiment=synthetic/kd", f"teacher.ckpt={teacher}", *data, "distill.teacher_cache.mode=disk",
              "distill.teacher_cache.views=1"]

    def distill(name: str, store: str) -> dict | None:
        folder = work / name
        if run([*cached, f"distill.teacher_cache.dir={work / store}", f"hydra.run.dir={folder}"], work, log).returncode:
            soak.problem(f"the cached run {name} failed (see {log})")
            return None
        return {"hit_rate": hit_rate(folder), "metrics": json.loads((folder / "results.json").read_text())["metrics"]}

    cold, warm = distill("data_cold", "store"), distill("data_warm", "store")
    if not cold or not warm:
        return
    if (cold["hit_rate"], warm["hit_rate"]) != (0.0, 1.0):
        soak.problem(f"the unchanged data gave hit rates {cold['hit_rate']} then {warm['hit_rate']}, not 0 then 1")
    sizes = sorted(p.stat().st_size for p in images.rglob("*.bmp"))
    write_images(images, seed=1)  # the same names, count and sizes; other pixels
    if sorted(p.stat().st_size for p in images.rglob("*.bmp")) != sizes:
        soak.problem("the rewritten images changed size; the cycle would not test a same-size replacement")
    changed, fresh = distill("data_changed", "store"), distill("data_fresh", "fresh_store")
    soak.counts["changed-data reruns"] += 1
    if not changed or not fresh:
        return
    if changed["hit_rate"] != 0.0:
        soak.problem(f"after the images changed, the cache served a share {changed['hit_rate']} of stale teacher rows")
    if changed["metrics"] != fresh["metrics"]:
        soak.problem(f"after the images changed, the cached run ended at {changed['metrics']}, not where a run with a "
                     f"fresh store ends ({fresh['metrics']})")


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print the counts; 0 when every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=12, help="kill/resume cycles on the single run (default 12)")
    parser.add_argument("--sweep-cycles", type=int, default=6, help="kill/resume cycles on the sweep (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary folder)")
    parser.add_argument("--full-disk", action=argparse.BooleanOptionalAction, default=True,
                        help="the full-disk cycle (a tmpfs; needs root, else skipped with the reason)")
    parser.add_argument("--changed-data", action=argparse.BooleanOptionalAction, default=True,
                        help="the changed-data cycle (teacher cache over images replaced in place)")
    args = parser.parse_args(argv)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="kdx-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng, soak = random.Random(args.seed), Soak()
    t0 = time.time()
    if args.cycles:
        soak_run(work, args.cycles, rng, soak)
    if args.sweep_cycles:
        soak_sweep(work, args.sweep_cycles, rng, soak)
    if args.full_disk:
        soak_full_disk(work, soak)
    if args.changed_data:
        soak_changed_data(work, soak)
    print(f"\nfault soak in {work} ({time.time() - t0:.0f} s):")
    for name, value in soak.counts.items():
        print(f"  {name:32s} {value}")
    for what in soak.skipped:
        print(f"  skipped: {what}")
    print(f"  {'problems':32s} {len(soak.problems)}")
    for p in soak.problems:
        print(f"    - {p}")
    print("PASSED" if not soak.problems else "FAILED")
    return 1 if soak.problems else 0


if __name__ == "__main__":
    sys.exit(main())
