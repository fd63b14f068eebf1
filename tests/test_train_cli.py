"""kdx-train as a user runs it: runs write their outputs, bad input is refused by name (every config is
instantiated in test_configs.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, compose_train
from kdx.errors import CheckpointError, ConfigError, ModelNotFoundError, RunExistsError
from kdx.train import run_training

BIN = Path(sys.executable).parent
FAST = ["trainer.max_epochs=1", "trainer.progress_bar=none", "trainer.log_every_n_steps=1", "data.train_size=128", "data.val_size=32",
        "data.test_size=32"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher")
    results = run_training(compose_train(["experiment=synthetic/teacher", *FAST, "trainer.max_epochs=4"]), run_dir)
    return run_dir, results


def test_a_run_writes_config_checkpoints_metrics_and_results(teacher_run):
    run_dir, results = teacher_run
    assert results["status"] == "completed"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["metrics"]["test/acc1"] == results["metrics"]["test/acc1"] > 0.25
    assert saved["params"]["network"] > 0 and saved["time"]["fit_s"] > 0
    loops = saved["time"]["train_epoch_s"]  # each epoch's training loop, without set-up and validation
    assert len(loops) == 4 and all(0 < t for t in loops) and sum(loops) < saved["time"]["fit_s"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.csv").is_file()
    assert Path(saved["checkpoints"]["best"]).is_file() and Path(saved["checkpoints"]["last"]).is_file()
    assert "train/loss_ce" in (run_dir / "metrics.csv").read_text().splitlines()[0]


def test_distill_from_the_teacher_checkpoint_logs_each_term(teacher_run, tmp_path):
    ckpt = teacher_run[1]["checkpoints"]["best"]
    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={ckpt}", "+distill.mix.mse.weight=0.5", *FAST])
    results = run_training(cfg, tmp_path)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert {"train/loss_kd", "train/loss_mse", "train/loss_ce", "train/loss_step"} <= set(header.split(","))
    assert results["hparams"]["temperature"] == 4.0 and results["params"]["teacher"] > results["params"]["network"]


def test_probe_on_the_teacher_checkpoint(teacher_run, tmp_path):
    ckpt = teacher_run[1]["checkpoints"]["best"]
    results = run_training(compose_train(["experiment=synthetic/probe", f"teacher.ckpt={ckpt}", *FAST,
                                                 "trainer.max_epochs=4", "data.train_size=512", "optim.lr=0.5"]), tmp_path)
    assert results["metrics"]["test/acc1"] > 0.5


@pytest.mark.parametrize("override,error,message", [
    ("distill.temperature=0", ConfigError, "distill.temperature must be a finite number > 0, got 0"),
    ("distill.temperature=-2", ConfigError, "distill.temperature must be a finite number > 0"),
    ("distill.temperature=inf", ConfigError, "distill.temperature must be a finite number > 0, got inf"),
    ("distill.method=dkdd", ConfigError, "distill.method='dkdd' is not a known distillation method .did you mean dkd"),
    ("+distill.betta=3", ConfigError, "distill.betta is not a parameter of distillation method 'kd'"),
    ("distill.alpha=1.5", ConfigError, r"distill.alpha must be a number in \[0, 1\], got 1.5"),
    ("student.name=resnet_9000", ModelNotFoundError, "unknown model name 'resnet_9000'"),
    ("teacher.ckpt=/nowhere/teacher.ckpt", CheckpointError, "checkpoint /nowhere/teacher.ckpt does not exist"),
])
def test_bad_distillation_settings_are_named(teacher_run, tmp_path, override, error, message):
    ckpt = teacher_run[1]["checkpoints"]["best"]
    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={ckpt}", *FAST, override])
    with pytest.raises(error, match=message):
        run_training(cfg, tmp_path / "run")


def test_teacher_checkpoint_with_other_class_count_is_refused(teacher_run, tmp_path):
    ckpt = teacher_run[1]["checkpoints"]["best"]
    cfg = compose_train(["experiment=synthetic/kd", f"teacher.ckpt={ckpt}", *FAST, "data.num_classes=6"])
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} predicts 4 classes but the data has 6"):
        run_training(cfg, tmp_path)


def test_distillation_without_a_teacher_says_what_to_set(tmp_path):
    with pytest.raises(ConfigError, match="set teacher.ckpt=PATH"):
        run_training(compose_train(["experiment=synthetic/kd", *FAST]), tmp_path)


def test_cli_refuses_to_overwrite_a_finished_run(teacher_run):
    run_dir, _ = teacher_run
    before = (run_dir / "results.json").read_bytes(), (run_dir / "checkpoints" / "best.ckpt").stat().st_mtime
    env = cli_env()
    proc = subprocess.run([BIN / "kdx-train", "experiment=synthetic/teacher", f"hydra.run.dir={run_dir}", *FAST],
                          capture_output=True, text=True, env=env, cwd=run_dir.parent, timeout=300)
    assert proc.returncode == 2
    assert f"kdx: error: {run_dir} already holds a finished run" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = (run_dir / "results.json").read_bytes(), (run_dir / "checkpoints" / "best.ckpt").stat().st_mtime
    assert before == after


def test_cli_rejects_a_missing_data_folder_in_one_sentence(tmp_path):
    proc = subprocess.run([BIN / "kdx-train", "experiment=folder/student", f"data.root={tmp_path / 'missing'}",
                           "student.name=cnn_tiny", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=300)
    assert proc.returncode == 2
    assert f"data folder {tmp_path / 'missing'} does not exist" in proc.stderr and "Traceback" not in proc.stderr
