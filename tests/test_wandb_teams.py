"""W&B the way teams use it, read back from offline runs: the jobs of a sweep share a group, the stage is the
job_type, the config is flat plain values, the best student checkpoint (and the pipeline's ONNX export) is a
`model` artifact, and scripts/wandb_sweep.yaml drives kdx-train the way a W&B sweep agent runs it."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, cli_env, compose_train, run_cli
from test_logging import wandb_records

SWEEP_FILE = REPO / "scripts" / "wandb_sweep.yaml"


def wandb_dirs(tmp_path: Path) -> dict[str, str]:
    """W&B's artifact staging and cache folders inside the test's folder (not the user's ~/.cache)."""
    return {"WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}


def offline_run(run_dir: Path) -> Path:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def read_run(offline: Path) -> dict:
    """The run record, its config as {key: value}, and its artifacts as {name: (type, aliases, files)}."""
    out: dict = {"run": None, "config": {}, "artifacts": {}}
    for record in wandb_records(offline):
        kind = record.WhichOneof("record_type")
        items = []
        if kind == "run":
            out["run"] = record.run
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        elif kind == "artifact":
            art = record.artifact
            out["artifacts"][art.name] = (art.type, sorted(art.aliases), sorted(e.path for e in art.manifest.contents))
        for item in items:
            out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def read_run_with(offline: Path, artifact: str, timeout: float = 30) -> dict:
    """read_run once the record of `artifact` is in the file: W&B's service writes the last records of a finished
    offline run shortly after wandb.finish returns."""
    deadline = time.monotonic() + timeout
    while True:
        found = read_run(offline)
        if artifact in found["artifacts"] or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def assert_plain(config: dict) -> None:
    for key, value in config.items():
        if key.startswith("_"):  # W&B's own bookkeeping (_wandb)
            continue
        assert not isinstance(value, dict), (key, value)  # flat: one key per setting
        assert not (isinstance(value, str) and "${" in value), (key, value)  # resolved
        if isinstance(value, list):
            assert all(v is None or isinstance(v, (bool, int, float, str)) for v in value), (key, value)


@pytest.mark.slow
def test_multirun_jobs_share_a_group_the_stage_is_job_type_the_student_an_artifact(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = run_cli("kdx-train", "-m", "experiment=synthetic/student", "seed=1,2", "trainer.max_epochs=1",
                  "data.train_size=128", "trainer.progress_bar=none", "logger=csv_wandb",
                  "logger.wandb.project=kdx-tests", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                  env={**wandb_dirs(tmp_path), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    groups = set()
    lr = float(compose_train(["experiment=synthetic/student"]).optim.lr)
    for job, seed in (("0", 1), ("1", 2)):
        results = json.loads((sweep / job / "results.json").read_text())
        found = read_run(offline_run(sweep / job))
        run = found["run"]
        groups.add(run.run_group)
        assert run.job_type == "student" and run.project == "kdx-tests"
        config = found["config"]
        assert config["seed"] == seed and config["optim.lr"] == pytest.approx(lr)
        assert config["module.num_classes"] == 4 and "module.optim.lr" in config  # the module's own arguments, flat
        assert_plain(config)
        name = f"model-{results['wandb']['id']}"
        assert results["wandb"]["artifact"] == name
        assert found["artifacts"][name] == ("model", ["best", "latest"], ["best.ckpt"])
    assert groups == {f"synthetic_student-{sweep.name}"}


@pytest.mark.slow
def test_wandb_sweep_file_drives_kdx_train_as_the_agent_runs_it(tmp_path: Path, synthetic_teacher: Path) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(SWEEP_FILE.read_text())
    assert sweep["program"] == "kdx-train" and sweep["metric"]["name"] == "val/acc1"
    point = {key: {"value": spec["values"][0]} for key, spec in sweep["parameters"].items()}
    macros = {**create_sweep_command_args({"args": point}), "env": ["/usr/bin/env"],
              "program": [str(BIN / sweep["program"])]}
    command = []
    for part in sweep["command"]:  # what `wandb agent` does with the command list
        command += macros[part[2:-1]] if part.startswith("${") and part.endswith("}") else [part]
    command += ["trainer.max_epochs=1", "trainer.progress_bar=none"]  # keep the test short
    env = {**wandb_dirs(tmp_path), "WANDB_MODE": "offline", "WANDB_SWEEP_ID": "sw42", "WANDB_RUN_ID": "agentrun1",
           "WANDB_PROJECT": "kdx-sweeps", "KDX_TEACHER_CKPT": str(synthetic_teacher), "OMP_NUM_THREADS": "1"}
    assert command[0] == "/usr/bin/env" and shutil.which("env")
    out = subprocess.run([*command, "hydra.run.dir=run"], cwd=tmp_path, env=cli_env(**env), capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["hparams"]["temperature"] == 2.0 and results["hparams"]["alpha"] == 0.5
    assert results["wandb"]["id"] == "agentrun1"  # the id the agent gave the run, so it counts in the sweep
    found = read_run(offline_run(tmp_path / "run"))
    run = found["run"]
    assert (run.run_id, run.project, run.run_group, run.job_type) == ("agentrun1", "kdx-sweeps",
                                                                      "synthetic_kd-sweep-sw42", "distill")
    assert found["config"]["distill.temperature"] == 2.0 and found["config"]["distill.alpha"] == 0.5
    assert found["config"]["teacher.ckpt"] == str(synthetic_teacher)  # ${oc.env:...} resolved, a plain path
    assert_plain(found["config"])
    assert found["artifacts"]["model-agentrun1"][2] == ["best.ckpt"]


@pytest.mark.slow
def test_teacher_runs_log_no_artifact_unless_asked_and_a_bad_choice_is_one_sentence(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    from kdx.errors import ConfigError
    from kdx.train import run_training

    for key, value in wandb_dirs(tmp_path).items():
        monkeypatch.setenv(key, value)
    base = ["experiment=synthetic/teacher", "trainer.max_epochs=1", "data.train_size=64", "trainer.progress_bar=none",
            "logger=csv_wandb"]
    with pytest.raises(ConfigError, match="logger.wandb.log_best must be one of student, all, none, got 'best'"):
        run_training(compose_train([*base, "logger.wandb.log_best=best"]), tmp_path / "bad")
    results = run_training(compose_train(base), tmp_path / "teacher")
    found = read_run(offline_run(tmp_path / "teacher"))
    assert found["run"].job_type == "teacher" and not found["artifacts"] and "artifact" not in results["wandb"]
    results = run_training(compose_train([*base, "logger.wandb.log_best=all", "seed=3"]), tmp_path / "all")
    name = results["wandb"]["artifact"]
    assert read_run_with(offline_run(tmp_path / "all"), name)["artifacts"][name][0] == "model"


@pytest.mark.slow
def test_pipeline_comparison_logs_the_onnx_export_as_an_artifact(tmp_path: Path, synthetic_teacher: Path,
                                                                monkeypatch) -> None:
    from kdx.export import export_network
    from kdx.train.wandb_logging import log_comparison_to_wandb

    for key, value in wandb_dirs(tmp_path).items():
        monkeypatch.setenv(key, value)
    onnx = tmp_path / "student_distilled.onnx"
    export_network(synthetic_teacher, onnx, format="onnx")
    cfg = compose_train(["logger=csv_wandb", "run_name=demo"])
    rows = [{"model": "teacher", "params": 77652, "test top-1": 1.0},
            {"model": "student distilled", "params": 4412, "test top-1": 0.99, "onnx_file": str(onnx)}]
    info = log_comparison_to_wandb(rows, cfg, tmp_path / "cmp")
    assert info["artifact"] == "demo-student-onnx"
    found = read_run_with(Path(info["dir"]), "demo-student-onnx")
    assert found["artifacts"]["demo-student-onnx"] == ("model", ["best", "latest"], ["student_distilled.onnx",
                                                                                     "student_distilled.onnx.json"])
    assert found["run"].job_type == "comparison"
