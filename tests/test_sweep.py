"""Sweeps: a failed job does not stop the others, a re-run skips finished jobs, ready sweep configs compose,
Optuna gets each job's metric, bad sweep values and unknown pairs are clear errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import compose_train, run_cli
from kdx.errors import ConfigError
from kdx.runs import job_return_value, resolve_run_dir
from kdx.tasks import validate_config

FAST = ["trainer.max_epochs=1", "trainer.progress_bar=none"]


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


def test_failed_job_does_not_stop_sweep_and_rerun_skips_finished(tmp_path: Path, synthetic_teacher: Path) -> None:
    sweep = tmp_path / "sweep"
    base = ["-m", "experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", *FAST]
    first = run_cli("kdx-train", *base, "distill.temperature=2,abc", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 1, first.stderr[-2000:]
    assert results(sweep / "0")["status"] == "completed"
    failed = results(sweep / "1")
    assert failed["status"] == "failed" and "distill.temperature" in failed["error"] and "'abc'" in failed["error"]
    assert "distill.temperature must be a number" in first.stderr  # one line per failed job
    assert "1 failed" in first.stdout and "failed: 1" in first.stderr  # end-of-sweep summary
    done_before = results(sweep / "0")

    # re-run the same sweep folder with one override: the finished job is skipped, the failed one runs again
    second = run_cli("kdx-train", *base, "distill.temperature=2,3", f"resume={sweep}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "already holds this finished run; skipped" in second.stdout
    assert results(sweep / "0") == done_before  # untouched
    assert results(sweep / "1")["status"] == "completed"
    assert results(sweep / "1")["hparams"]["temperature"] == 3.0
    assert all("resume" not in o for o in results(sweep / "1")["overrides"])

    from kdx.report import make_report  # the skipped job is visible to kdx-report

    report = make_report(sweep)
    assert len(report.ranked) == 2 and not report.failed


def test_job_return_value_for_sweepers() -> None:
    done = {"status": "completed", "monitor": {"metric": "val/acc1"},
            "metrics": {"val/acc1": 0.5, "best_val/acc1": 0.75, "test/acc1": 0.6}}
    assert job_return_value(done) == 0.75
    assert job_return_value(done, "test/acc1") == 0.6
    assert math.isnan(job_return_value({"status": "failed"}))
    assert math.isnan(job_return_value(done, "val/missing"))


def test_resume_run_dir_resolution(tmp_path: Path) -> None:
    base = tmp_path / "multirun" / "kd"
    assert resolve_run_dir(True, str(base), "NOW") == f"{base}/NOW"  # nothing to resume yet
    assert not base.exists()
    # a new run's folder is created (claimed) as it is resolved; the same stamp again gets a folder of its own
    assert resolve_run_dir(False, str(base), "2026-01-01_09-00-00") == f"{base}/2026-01-01_09-00-00"
    assert resolve_run_dir(False, str(base), "2026-01-01_09-00-00") == f"{base}/2026-01-01_09-00-00-2"
    assert (base / "2026-01-01_09-00-00").is_dir() and (base / "2026-01-01_09-00-00-2").is_dir()
    for name in ("2026-01-01_10-00-00", "2026-01-02_10-00-00", "2026-01-03_10-00-00.replaced-x"):
        (base / name).mkdir(parents=True)
    assert resolve_run_dir(True, str(base), "NOW") == str(base / "2026-01-02_10-00-00")
    assert resolve_run_dir("some/folder", str(base), "NOW") == "some/folder"


@pytest.mark.parametrize("override, message", [
    ("distill.temperature=abc", "distill.temperature must be a number, got 'abc'"),
    ("trainer.max_epochs=ten", "trainer.max_epochs must be a whole number or null, got 'ten'"),
    ("checkpoint.save_last=maybe", "checkpoint.save_last must be true or false, got 'maybe'"),
    ("optim.nesterov=maybe", "optim.nesterov must be true or false, got 'maybe'"),
    ("task.label_smoothing=lots", "task.label_smoothing must be a number, got 'lots'"),
    ("teacher.kwargs=3", "teacher.kwargs must be a mapping, got 3"),
    ("distill.logit_standardization=yes", "distill.logit_standardization must be true or false, got 'yes'"),
    ("seed=abc", "seed must be a whole number, got 'abc'"),
])
def test_sweep_value_of_wrong_type_names_key_and_value(override: str, message: str) -> None:
    """The schemas (kdx.schemas, each task's Options, the datamodule's, optimizer's and method's signatures) refuse
    a value of the wrong type in one sentence naming the key, without composing the config a second time."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(compose_train(["experiment=synthetic/kd", "teacher.ckpt=t.ckpt", override]))
    validate_config(compose_train(["experiment=synthetic/kd", "teacher.ckpt=t.ckpt", "distill.temperature=8"]))


def test_wrong_type_single_run_exits_2_with_one_sentence(tmp_path: Path) -> None:
    out = run_cli("kdx-train", "experiment=synthetic/kd", "teacher.ckpt=x.ckpt", "data.batch_size=big", cwd=tmp_path)
    assert out.returncode == 2
    assert "kdx: error: data.batch_size must be a whole number, got 'big'" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_pair_lists_available_pairs(tmp_path: Path) -> None:
    out = run_cli("kdx-train", "-m", "experiment=synthetic/kd", "pair=synthetic_tiny,no_such_pair", cwd=tmp_path)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert out.returncode == 2
    assert "kdx: error: pair=synthetic_tiny,no_such_pair: no_such_pair is not an option of the pair group" in text
    assert "synthetic_tiny" in text and "resnet20_cnn_small" in text  # the available pairs are listed
    assert "Traceback" not in text and len(out.stderr.strip().splitlines()) == 1


def test_ready_sweep_configs_and_launchers_compose() -> None:
    grid = compose_train(["experiment=synthetic/kd", "sweep=kd_grid"], return_hydra_config=True)
    params = grid.hydra.sweeper.params
    assert params["distill.temperature"] == "1,2,4,8" and params["distill.alpha"] == "0.1,0.5,0.9"
    assert str(grid.hydra.mode) == "RunMode.MULTIRUN"
    assert grid.teacher.ckpt == "teachers/synthetic_tiny.ckpt"  # one teacher per pair

    slurm = compose_train(["experiment=synthetic/kd", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                           "hydra/launcher=slurm"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.tasks_per_node == 4 and slurm.hydra.launcher.nodes == 2
    assert slurm.hydra.launcher.gpus_per_node == 4
    cpu_slurm = compose_train(["hydra/launcher=slurm"], return_hydra_config=True)
    assert cpu_slurm.hydra.launcher.nodes == 1

    joblib = compose_train(["hydra/launcher=parallel", "hydra.launcher.n_jobs=3"], return_hydra_config=True)
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher") and joblib.hydra.launcher.n_jobs == 3

    several = compose_train(["logger=[csv,tensorboard,wandb]"])
    assert set(several.logger) == {"csv", "tensorboard", "wandb"}
    assert set(compose_train(["logger=all"]).logger) == {"csv", "tensorboard", "wandb"}
