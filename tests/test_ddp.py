"""DDP for real with 2 CPU processes (gloo): same metrics as one process with the same global batch, the frozen
teacher is never wrapped for gradient sync, and DDP jobs inside a Hydra multirun complete."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, compose_train, run_cli
from kdx.train import run_training

# Equivalence: 256 training images, one full-data step per epoch (2 processes x 128 vs 1 x 256), 8 epochs of the
# small student CNN. Same global batch, so the gradients differ only through BatchNorm: each rank normalises with
# its own half-batch statistics (torch's SyncBatchNorm has no CPU version). Measured on CPU: val/acc1 0.9375 in
# both, test/acc1 0.953 in both, val/loss 0.7042 vs 0.7020, test/loss 0.7125 vs 0.7103.
EQUIV = ["experiment=synthetic/student", "data.train_size=256", "trainer.max_epochs=8", "optim.lr=0.2",
         "trainer.progress_bar=none"]
LOSS_TOL = 0.01    # absolute, on val/test cross-entropy
ACC_TOL = 2 / 128  # at most two of the 128 val/test images may flip


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    ddp_dir = tmp_path / "ddp"
    out = run_cli("kdx-train", *EQUIV, "trainer=ddp", "trainer.devices=2", "data.batch_size=128",
                  f"hydra.run.dir={ddp_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = json.loads((ddp_dir / "results.json").read_text())
    single = run_training(compose_train([*EQUIV, "data.batch_size=256"]), tmp_path / "single")
    assert ddp["global_step"] == single["global_step"] == 8
    for key in ("val/loss", "test/loss"):
        assert abs(ddp["metrics"][key] - single["metrics"][key]) <= LOSS_TOL, (key, ddp["metrics"], single["metrics"])
    for key in ("val/acc1", "test/acc1"):
        assert abs(ddp["metrics"][key] - single["metrics"][key]) <= ACC_TOL, (key, ddp["metrics"], single["metrics"])
    assert not list(ddp_dir.glob("**/results.json.*"))  # written once, by rank 0


def test_sync_batchnorm_on_cpu_is_a_clear_error(tmp_path: Path) -> None:
    from kdx.errors import ConfigError
    from kdx.train.trainer import build_trainer

    cfg = compose_train(["trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=true"])
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true needs GPUs"):
        build_trainer(cfg, tmp_path)


TEACHER_CHECK = textwrap.dedent('''
    import json, os, sys
    import pytorch_lightning as pl
    import torch
    from kdx.lit import DistillationModule
    from kdx.models import build_model
    from kdx.data import SyntheticDataModule

    out = sys.argv[1]

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            wrapped = trainer.strategy.model
            ddp_params = {id(p) for p in wrapped.parameters()}
            teacher = list(module.teacher.parameters())
            info = {"rank": trainer.global_rank, "wrapper": type(wrapped).__name__,
                    "teacher_in_ddp": any(id(p) in ddp_params for p in teacher),
                    "student_in_ddp": all(id(p) in ddp_params for p in module.net.parameters()),
                    "teacher_frozen": not any(p.requires_grad for p in teacher),
                    "teacher_eval": not module.teacher.training, "student_train": module.net.training,
                    "teacher_grads": any(p.grad is not None for p in teacher),
                    "distillers_in_ddp": all(id(p) in ddp_params for p in module.distillers.parameters()),
                    "regressor_sum": float(sum(p.detach().double().sum() for p in module.distillers.parameters()))}
            with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump(info, f)

    pl.seed_everything(0)
    dm = SyntheticDataModule(train_size=128, val_size=32, test_size=32, batch_size=32)
    dm.setup("fit")
    teacher = build_model("resnet8", num_classes=4, in_chans=3)
    module = DistillationModule(build_model("cnn_tiny", num_classes=4, in_chans=3), teacher, 4,
                                distill={"method": "kd", "mix": {"fitnet": {"weight": 10.0}}},
                                example_input=torch.randn(2, 3, 16, 16))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Check()])
    trainer.fit(module, datamodule=dm)
''')


@pytest.mark.slow
def test_teacher_is_frozen_and_not_wrapped_by_ddp_on_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "check_teacher.py"
    script.write_text(TEACHER_CHECK)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info["wrapper"] == "DistributedDataParallel"
        assert info["student_in_ddp"] and not info["teacher_in_ddp"]
        assert info["teacher_frozen"] and info["teacher_eval"] and not info["teacher_grads"]
        assert info["student_train"]
        assert info["distillers_in_ddp"]  # FitNet's regressor is trained, and synchronised like the student
    sums = [json.loads((tmp_path / f"rank{rank}.json").read_text())["regressor_sum"] for rank in (0, 1)]
    assert sums[0] == pytest.approx(sums[1], rel=1e-9)  # identical on both ranks after two synchronised steps


@pytest.mark.slow
def test_ddp_inside_multirun_completes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = run_cli("kdx-train", "-m", "experiment=synthetic/teacher", "trainer=ddp", "trainer.devices=2",
                  "trainer.max_epochs=1", "data.train_size=128", "trainer.progress_bar=none", "seed=1,2",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 job(s) completed, 0 failed" in out.stdout
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        assert results["status"] == "completed" and results["hparams"]["seed"] == int(job) + 1
        assert results["global_step"] == 1  # 128 images / (2 ranks x 64): both ranks took part
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()  # no stray runs from ranks > 0


@pytest.mark.slow
def test_teacher_cache_counts_in_the_record_are_summed_over_the_ranks(tmp_path: Path, synthetic_teacher) -> None:
    """Two gloo ranks each look up their half of the 128 images per epoch: the run's record and its closing line
    count every lookup of both ranks (2 epochs x 128), not rank 0's half."""
    run_dir = tmp_path / "run"
    out = run_cli("kdx-train", "experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "trainer=ddp",
                  "trainer.devices=2", "trainer.max_epochs=2", "data.train_size=128", "data.batch_size=32",
                  "trainer.progress_bar=none", "distill.teacher_cache.mode=memory", f"hydra.run.dir={run_dir}",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    cache = json.loads((run_dir / "results.json").read_text())["teacher_cache"]
    assert cache["mode"] == "memory" and cache["dir"] is None
    assert cache["hits"] + cache["misses"] == 256 and cache["misses"] >= 128, cache
    assert f"teacher cache (memory): {cache['hits']:,} hits, {cache['misses']:,} misses" in out.stdout
