"""Resume and reproducibility: a killed run resumes from last.ckpt (same W&B run, metrics.csv kept), a finished
run is skipped or (force=true) set aside, no checkpoint is a clear error, same seed -> same metrics, atomic saves."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, cli_env, compose_train, run_cli
from kdx.errors import CheckpointError, RunExistsError
from kdx.runs import check_run_dir
from kdx.train import run_identity, run_training
from kdx.train.metrics_csv import merge_parts
from kdx.train.trainer import FAULT_PAUSE_ENV, AtomicCheckpointIO

QUIET = ["trainer.progress_bar=none"]


def teacher_cfg(*overrides: str):
    return compose_train(["experiment=synthetic/teacher", "trainer.max_epochs=1", *QUIET, *overrides])


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    overrides = ["trainer.max_epochs=2", "trainer.deterministic=true"]
    first = run_training(teacher_cfg(*overrides), tmp_path / "a")
    second = run_training(teacher_cfg(*overrides), tmp_path / "b")
    assert first["metrics"] == second["metrics"]  # bit-identical on CPU
    other = run_training(teacher_cfg(*overrides, "seed=1"), tmp_path / "c")
    assert other["metrics"] != first["metrics"]


def test_a_resumed_run_draws_what_an_uninterrupted_one_draws(tmp_path: Path, monkeypatch) -> None:
    """The fast version of the kill-and-resume soak (make faults): a run interrupted at the start of its second
    epoch and resumed from last.ckpt ends with the metrics of an uninterrupted run, bit for bit. Epoch 2's
    shuffle and dropout come from torch's generator, so a resume that does not restore it (kdx.RandomState)
    trains on another order and ends elsewhere."""
    from kdx.errors import RunInterrupted
    from kdx.train.trainer import InterruptCheck, InterruptState

    overrides = ["trainer.max_epochs=2", "trainer.deterministic=true", "data.train_size=256"]
    reference = run_training(teacher_cfg(*overrides), tmp_path / "reference")
    run_dir, original = tmp_path / "run", InterruptCheck.on_train_epoch_start
    fired: list[int] = []

    def interrupt_once(self, trainer, *args, **kwargs):
        if trainer.current_epoch == 1 and not fired:  # as a Ctrl-C between the epochs would
            fired.append(1)
            InterruptState.requested = 1
        return original(self, trainer, *args, **kwargs)

    monkeypatch.setattr(InterruptCheck, "on_train_epoch_start", interrupt_once)
    with pytest.raises(RunInterrupted):
        run_training(teacher_cfg(*overrides), run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    torch.manual_seed(12345)  # whatever the process drew in between
    resumed = run_training(teacher_cfg(*overrides, f"resume={run_dir}"), run_dir)
    assert resumed["status"] == "completed" and resumed["resumes"] == 1
    assert resumed["metrics"] == reference["metrics"]
    # its fit time covers the one epoch trained after the resume, and says so (per-epoch times divide by it)
    assert reference["time"]["fit_epochs"] == 2 and resumed["time"]["fit_epochs"] == 1 and resumed["epochs"] == 2
    assert len(resumed["time"]["train_epoch_s"]) == 1


def test_finished_run_is_skipped_reported_or_set_aside(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_training(teacher_cfg(), run_dir)
    with pytest.raises(RunExistsError, match="resume=true reports it, force=true reruns it"):
        run_training(teacher_cfg(), run_dir)
    assert run_training(teacher_cfg("resume=true"), run_dir) == done  # reported, not retrained
    assert check_run_dir(run_dir, teacher_cfg(), run_identity, multirun=True)[0] == "skip"
    with pytest.raises(RunExistsError, match=r"different config \(it differs in .*seed.*pass force=true"):
        check_run_dir(run_dir, teacher_cfg("seed=5"), run_identity, multirun=True)
    again = run_training(teacher_cfg("force=true"), run_dir)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and json.loads((aside[0] / "results.json").read_text()) == done
    assert (aside[0] / "checkpoints" / "last.ckpt").is_file()
    assert again["status"] == "completed" and again["started_at"] >= done["started_at"]


def test_resume_without_checkpoint_names_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "never_trained"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=rf"nothing to resume in {empty}: it holds no checkpoint"):
        run_training(teacher_cfg(f"resume={empty}"), empty)
    out = run_cli("kdx-train", "experiment=synthetic/teacher", f"resume={empty}", cwd=tmp_path)
    assert out.returncode == 2 and f"kdx: error: nothing to resume in {empty}" in out.stderr


def test_checkpoints_are_written_atomically(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)

    class Exploding:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # fails while pickling the weights
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3), "bad": Exploding()}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))  # old one intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind


def test_metrics_csv_parts_are_merged(tmp_path: Path) -> None:
    (tmp_path / "metrics.part-1.csv").write_text("epoch,step,val/acc1\n0,7,0.5\n")
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n1,15,0.3\n")
    merge_parts(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[0]["val/acc1"] == "0.5" and rows[1]["train/loss"] == "0.3"
    assert not list(tmp_path.glob("metrics.part-*"))


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint_and_same_wandb_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["experiment=synthetic/teacher", "trainer.max_epochs=3", "data.train_size=1024", "logger=csv_wandb",
            "trainer.log_every_n_steps=4", *QUIET]
    # every checkpoint save pauses 2 s between writing its temporary file and renaming it (the fault-injection
    # hook of kdx.train.trainer): once last.ckpt of epoch 1 exists, the next temporary file is a save of a later
    # epoch, in its pause, so the kill below lands mid-training whatever the machine's speed
    env = cli_env(WANDB_MODE="offline", **{FAULT_PAUSE_ENV: "2"})
    proc = subprocess.Popen([str(BIN / "kdx-train"), *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if last.exists() and any(p.name.startswith(".") and ".tmp-" in p.name for p in last.parent.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a later epoch's checkpoint save began"
    # killed mid-training, in a later epoch's checkpoint save, with its whole process group (as a scheduler or
    # a crash does): W&B's service process goes too and releases the run id
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    interrupted = json.loads((run_dir / "results.json").read_text())
    assert interrupted["status"] == "running", "the run finished before it could be killed"
    epoch_killed = torch.load(last, weights_only=True)["epoch"]
    assert epoch_killed < 2

    out = run_cli("kdx-train", *args, f"resume={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming {run_dir}" in out.stdout
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumes"] == 1 and resumed["epochs"] == 3
    assert resumed["global_step"] == 3 * 1024 // 64
    assert resumed["wandb"]["id"] == interrupted["wandb"]["id"]  # the same W&B run continues
    assert (run_dir / "wandb-run-id").read_text().strip() == interrupted["wandb"]["id"]
    epochs = {r["epoch"] for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("epoch")}
    assert {"0", "2"} <= epochs  # rows from before the kill are kept
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(interrupted["wandb"]["id"]) for p in offline)
