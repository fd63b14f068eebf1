"""Multi-node runs with real processes on this one machine: two torchrun "nodes" (c10d rendezvous, gloo), two
srun-style SLURM tasks (the variables srun sets, by hand) in a Hydra multirun, and the submitit launcher through
submitit's local executor. Each job has one run folder and one results.json, written by rank 0; rank 0 decides
for every rank whether a folder is trained, resumed or skipped."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, cli_env, compose_train, run_cli
from kdx.errors import ConfigError

# One full-data step per epoch: 256 training images, as 2 ranks x 128 or 1 process x 256 (the same global batch
# and the same images in every step). The student's BatchNorm normalises each rank's half of the batch with that
# half's statistics (torch's SyncBatchNorm has no CPU version) and DDP keeps rank 0's running statistics, so the
# metrics agree closely, not bit for bit; the bounds are those of tests/test_ddp.py.
KD = ["experiment=synthetic/kd", "data.train_size=256", "trainer.max_epochs=8", "optim.lr=0.2",
      "trainer.progress_bar=none"]
TWO_NODES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2"]
LOSS_TOL = 0.01    # absolute, on val/test cross-entropy
ACC_TOL = 2 / 128  # at most two of the 128 val/test images may flip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    full = cli_env(OMP_NUM_THREADS="1", **env)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        full.pop(key, None)
    full.update(env)
    return subprocess.Popen(cmd, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def finish(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
    """Wait for every process; their outputs (all are killed if one runs past `timeout`)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def slurm_env(rank: int, port: int, job: str = "4242") -> dict[str, str]:
    """What srun sets for task `rank` of `srun --nodes=2 --ntasks-per-node=1` (each task its own "node")."""
    return {"SLURM_JOB_ID": job, "SLURM_JOB_NAME": "kdx", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_NODELIST": "localhost",
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def all_results(root: Path) -> list[Path]:
    return sorted(root.rglob("results.json"))


@pytest.mark.slow
def test_torchrun_two_nodes_one_run_folder_and_single_process_metrics(tmp_path: Path, synthetic_teacher: Path) -> None:
    from kdx.train import run_training

    port = free_port()
    args = [*KD, f"teacher.ckpt={synthetic_teacher}", *TWO_NODES, "data.batch_size=128"]
    nodes = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--rdzv-id", "kdxtest", "--local-addr", "127.0.0.1", "--no-python", str(BIN / "kdx-train"), *args],
                   cwd=tmp_path) for _ in (0, 1)]
    finish(nodes)
    run_dir = tmp_path / "outputs" / "synthetic_kd" / "torchrun-kdxtest"
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]  # one folder, named by the rendezvous id
    assert all_results(tmp_path) == [run_dir / "results.json"]
    two = json.loads((run_dir / "results.json").read_text())
    assert two["status"] == "completed"
    assert len((run_dir / "metrics.csv").read_text().splitlines()) > 1
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()

    one = run_training(compose_train([*KD, f"teacher.ckpt={synthetic_teacher}", "data.batch_size=256"]),
                       tmp_path / "single")
    assert two["global_step"] == one["global_step"] == 8  # 128 images on each of the 2 ranks: one step an epoch
    for key in ("val/loss", "test/loss"):
        assert abs(two["metrics"][key] - one["metrics"][key]) <= LOSS_TOL, (key, two["metrics"], one["metrics"])
    for key in ("val/acc1", "test/acc1"):
        assert abs(two["metrics"][key] - one["metrics"][key]) <= ACC_TOL, (key, two["metrics"], one["metrics"])


@pytest.mark.slow
def test_kdx_pipeline_under_torchrun_trains_every_stage_on_both_nodes_and_compares_once(tmp_path: Path) -> None:
    """kdx-pipeline's stages (teacher, student, kd) each run as one 2-node DDP job with one folder; rank 0 alone
    writes the comparison and pipeline.json, rank 1 says so."""
    port = free_port()
    args = ["experiment=synthetic", *TWO_NODES, "trainer.max_epochs=1", "data.train_size=128",
            "trainer.progress_bar=none"]
    nodes = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "kdxpipe",
                    "--local-addr", "127.0.0.1", "--no-python", str(BIN / "kdx-pipeline"), *args],
                   cwd=tmp_path) for _ in (0, 1)]
    outs = finish(nodes)
    run = tmp_path / "runs" / "synthetic"
    assert all_results(tmp_path) == [run / stage / "results.json" for stage in ("kd", "student", "teacher")]
    for stage in ("teacher", "student", "kd"):
        results = json.loads((run / stage / "results.json").read_text())
        assert results["status"] == "completed" and results["global_step"] == 1, stage  # 128 = 2 ranks x 64
    summary = json.loads((run / "pipeline.json").read_text())
    assert set(summary["stages"]) == {"teacher", "student", "kd"} and summary["comparison"]["rows"]
    assert (run / "comparison.md").is_file()
    ranks = {0 if "[kdx] comparison written to" in out else 1: out for out in outs}
    assert set(ranks) == {0, 1}, [out[-1500:] for out in outs]
    assert "rank 1: stages finished; rank 0 writes the comparison and pipeline.json" in ranks[1]
    assert "comparison written" not in ranks[1]


@pytest.mark.slow
def test_slurm_tasks_in_a_multirun_share_one_sweep_folder_and_skip_together(tmp_path: Path) -> None:
    args = ["-m", "experiment=synthetic/teacher", *TWO_NODES, "trainer.max_epochs=1", "data.train_size=128",
            "trainer.progress_bar=none", "seed=1,2"]
    port = free_port()
    finish([start([str(BIN / "kdx-train"), *args], tmp_path, **slurm_env(rank, port)) for rank in (0, 1)])
    sweep = tmp_path / "multirun" / "synthetic_teacher" / "slurm-4242"
    assert [p.name for p in sweep.parent.iterdir()] == [sweep.name]  # both tasks chose the job's folder
    assert all_results(tmp_path) == [sweep / "0" / "results.json", sweep / "1" / "results.json"]
    first = [json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1")]
    for seed, results in zip((1, 2), first):
        assert results["status"] == "completed" and results["hparams"]["seed"] == seed
        assert results["global_step"] == 1  # 128 images / (2 ranks x 64): both tasks took part
    assert not (tmp_path / "outputs").exists()

    # The same sweep again (as a requeued job would): rank 0 finds both jobs finished and every rank skips them.
    # A rank deciding alone would start training by itself and wait for rank 0 for ever.
    port = free_port()
    outs = finish([start([str(BIN / "kdx-train"), *args, f"resume={sweep}"], tmp_path, **slurm_env(rank, port))
                   for rank in (0, 1)], timeout=240)
    assert outs[0].count("already holds this finished run; skipped") == 2
    assert "skipped" not in outs[1]  # ranks > 0 say nothing of their own
    assert [json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1")] == first


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = run_cli("kdx-train", "-m", "experiment=synthetic/teacher", "hydra/launcher=local", "seed=1,2",
                  "trainer.max_epochs=1", "data.train_size=64", "trainer.progress_bar=none",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "2 job(s) completed, 0 failed" in out.stdout
    for job, seed in (("0", 1), ("1", 2)):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "completed" and results["hparams"]["seed"] == seed
        assert results["run_dir"] == str((sweep / job).resolve())
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # each job ran in a submitit process of its own


def test_torchrun_without_rendezvous_id_is_one_sentence(tmp_path: Path) -> None:
    env = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}
    out = run_cli("kdx-train", "experiment=synthetic/teacher", *TWO_NODES, cwd=tmp_path, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "without --rdzv-id" in out.stderr and "hydra.run.dir" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("env, overrides, message", [
    ({"TORCHELASTIC_RUN_ID": "j", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"},
     ["trainer=ddp", "trainer.devices=1"], "torchrun started 2 processes (--nnodes x --nproc-per-node) but "
                                           "trainer.devices x trainer.num_nodes = 1 x 1 = 1"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"},
     ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"], "with 2 per node but trainer.devices=1"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"},
     ["trainer=ddp", "trainer.devices=2"], "SLURM_NTASKS_PER_NODE is not set"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "2"},
     ["trainer=ddp", "trainer.devices=2", "trainer.strategy=ddp_spawn"], "needs trainer.strategy=ddp"),
])
def test_cluster_and_trainer_disagree_is_one_sentence(tmp_path: Path, monkeypatch, env, overrides, message) -> None:
    from kdx.train import run_training

    for key in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_training(compose_train(["experiment=synthetic/teacher", *overrides]), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any process group or folder


def test_cluster_ranks_agree_on_the_folder_and_only_rank_zero_creates_it(tmp_path: Path, monkeypatch) -> None:
    from kdx.ranks import cluster_launch, is_global_zero_process, launch_rank
    from kdx.runs import hydra_output_subdir, resolve_run_dir

    for key, value in slurm_env(1, 1234, job="99").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_STEP_ID", "3")  # a second srun in the same allocation
    assert cluster_launch() == "slurm" and launch_rank() == 1 and not is_global_zero_process()
    folder = resolve_run_dir(False, str(tmp_path / "runs"), "2026-01-01_00-00-00")
    assert folder == f"{tmp_path / 'runs'}/slurm-99.3" and not Path(folder).exists()  # rank 0 creates it
    assert hydra_output_subdir(False) is None  # Hydra's files: rank 0 writes them
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert resolve_run_dir(False, str(tmp_path / "runs"), "2026-01-01_00-00-01") == folder and Path(folder).is_dir()
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning ignores SLURM there, and so does kdx
    assert cluster_launch() is None
    assert resolve_run_dir(False, str(tmp_path / "runs"), "stamp").endswith("/stamp")
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job/7")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert resolve_run_dir(False, str(tmp_path / "runs"), "stamp").endswith("/torchrun-job_7")
