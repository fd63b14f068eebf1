"""What a newcomer met, each reproduced the way it was met (the README's own class, a console command), and fixed
at its cause: a Distiller without `name`, a resumed sweep that refused its finished jobs yet said all completed,
ONNX evaluation without the export's normalisation, an explicit data.root that did not hold the data, the
console line of the previous epoch, raw errors where one sentence with the fix belongs, the loggers and the
end-of-run lines."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli

FAST = ["trainer.max_epochs=1", "trainer.progress_bar=none"]


# ---------------------------------------------------------------- a method of one's own, as the README shows it

def _readme_method() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("**A method of your own**", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_own_method_says_name_and_registers(tmp_path, monkeypatch):
    from kdx.distill import build_distiller

    code = _readme_method()
    assert 'name = "' in code  # the paragraph shows the attribute a Distiller cannot do without
    (tmp_path / "readme_method.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    method = build_distiller("readme_method.MyMethod", {"temperature": 2.0})

    losses = method({"student_logits": torch.randn(4, 3), "teacher_logits": torch.randn(4, 3)})
    assert set(losses) == {"my_term"} and losses["my_term"].item() >= 0


def test_a_distiller_without_name_is_told_how_to_fix_it(tmp_path, monkeypatch):
    from kdx.errors import ConfigError
    from kdx.distill import build_distiller

    code = _readme_method().replace('name = "my_method"', "pass").replace("MyMethod", "NoName")
    (tmp_path / "nameless_method.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises((ValueError, ConfigError)) as err:
        build_distiller("nameless_method.NoName")
    assert "has no `name`" in str(err.value) and 'name = "noname"' in str(err.value)


# ---------------------------------------------------------------- a resumed sweep whose configs differ

def _hydra_files(job: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((job / ".hydra").glob("*.yaml"))}


@pytest.mark.slow
def test_a_resumed_sweep_with_another_config_fails_names_the_keys_and_leaves_the_jobs(tmp_path, synthetic_teacher):
    sweep = tmp_path / "sweep"
    base = ["-m", "experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", *FAST, "distill.temperature=2,3"]
    first = run_cli("kdx-train", *base, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {job: (_hydra_files(sweep / job), (sweep / job / "results.json").read_bytes()) for job in ("0", "1")}

    refused = run_cli("kdx-train", *base, "distill.alpha=0.25", f"resume={sweep}", cwd=tmp_path)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "0 job(s) completed, 2 failed" in refused.stdout
    assert "distill.alpha (0.9 -> 0.25)" in refused.stderr  # the differing key, old and new value
    for job in ("0", "1"):  # the finished jobs' files are as they were
        assert (_hydra_files(sweep / job), (sweep / job / "results.json").read_bytes()) == before[job]

    again = run_cli("kdx-train", *base, f"resume={sweep}", cwd=tmp_path)  # the settings it was made with
    assert again.returncode == 0 and "2 job(s) completed, 0 failed" in again.stdout, again.stderr[-2000:]
    assert all(_hydra_files(sweep / job) == before[job][0] for job in ("0", "1"))


# ---------------------------------------------------------------- kdx-eval of an exported model: its normalisation

class TanhColour(torch.nn.Module):
    """Embedding = tanh of the mean colour: tells colours apart on normalised input, saturates on raw 0..255."""

    def forward(self, x):
        return torch.tanh(x.mean(dim=(2, 3)))


def _faces(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        (root / f"id{i}").mkdir(parents=True)
        for j in range(4):
            arr = np.clip(np.array(c) + rng.integers(-10, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"id{i}" / f"{j}.png")
    return root


def test_kdx_eval_applies_the_exports_normalisation_and_honours_mean_std(tmp_path, capsys):
    from kdx.cli import eval_main

    model = tmp_path / "face.onnx"
    torch.onnx.export(TanhColour(), torch.zeros(1, 3, 8, 8), str(model), dynamo=False, input_names=["images"],
                      output_names=["embedding"], dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}})
    faces = _faces(tmp_path / "faces")

    def accuracy(*extra: str) -> tuple[float, str]:
        out = tmp_path / "m.json"
        assert eval_main([str(model), str(faces), "--num-pairs", "40", "--image-size", "16", "16", "--out", str(out),
                          *extra]) == 0
        return json.loads(out.read_text())["metrics"]["accuracy"], capsys.readouterr().out

    raw, printed = accuracy()  # no description beside it: raw 0..255 values, said so
    assert raw < 0.75 and "raw values in [0, 255]" in printed
    given, printed = accuracy("--mean", "0.5", "--std", "0.5")  # no longer ignored for ONNX
    assert given == 1.0 and "(x/255 - 0.5) / 0.5 (--mean/--std)" in printed
    (tmp_path / "face.onnx.json").write_text(json.dumps({"normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    recorded, printed = accuracy()
    assert recorded == 1.0 and "recorded in face.onnx.json" in printed


def test_an_onnx_teacher_takes_the_normalisation_its_export_records(tmp_path):
    """A kdx export used as teacher.onnx gets (x/255 - mean) / std from its <model>.json, as kdx-eval does, not
    the raw 0..255 values meant for SFace; a teacher.preprocess that contradicts the record is followed with a
    warning naming both; without a record the raw range stays (SFace's)."""
    from kdx.distill.teachers import build_face_teacher

    model = tmp_path / "face.onnx"
    net = TanhColour()
    torch.onnx.export(net, torch.zeros(1, 3, 8, 8), str(model), dynamo=False, input_names=["images"],
                      output_names=["embedding"], dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}})
    batch = torch.rand(4, 3, 8, 8) * 2 - 1  # the student's batch, normalised with the face data's 0.5 / 0.5
    raw = build_face_teacher({"onnx": str(model)})(batch)["embedding"]
    assert raw.abs().min() > 0.999  # 0..255 values into tanh: saturated, the [-1, 1] model's input is wrong
    (tmp_path / "face.onnx.json").write_text(json.dumps({"normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    recorded = build_face_teacher({"onnx": str(model)})(batch)["embedding"]
    assert torch.allclose(recorded, net(batch), atol=1e-5)  # exactly what the torch model gives the batch
    with pytest.warns(UserWarning, match=r"teacher.preprocess \(value_range=\[0, 255\]\) differs from the input "
                                         r"normalisation .*face.onnx.json records"):
        build_face_teacher({"onnx": str(model), "preprocess": {"value_range": [0, 255]}})


def test_classifier_exports_record_their_normalisation(synthetic_teacher, tmp_path):
    from kdx.export import export_network, sidecar_path

    export_network(synthetic_teacher, tmp_path / "c.onnx", format="onnx", check=False)
    side = json.loads(sidecar_path(tmp_path / "c.onnx").read_text())
    assert side["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # the synthetic data's


# ---------------------------------------------------------------- data.root given but without the data

def test_an_explicit_fashion_mnist_root_without_the_files_is_an_error_naming_it(tmp_path):
    nowhere = tmp_path / "nowhere"
    out = run_cli("kdx-train", "data=fmnist", "data.val_size=10", f"data.root={nowhere}", "data.download=false", *FAST,
                  cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout[-1500:] + out.stderr[-1500:]
    assert f"data.root={nowhere} does not hold the Fashion-MNIST IDX files" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_explicit_root_is_where_a_download_goes_and_must_succeed(tmp_path, monkeypatch):
    import torchvision.datasets

    from kdx.data.fashion_mnist import locate_fashion_mnist
    from kdx.errors import DataError

    seen = []

    class Offline:  # the mirror cannot be reached
        def __init__(self, root, train, download):
            seen.append(root)
            raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataError, match="download to .*nowhere failed"):
        locate_fashion_mnist(str(tmp_path / "nowhere"), download=True)
    assert seen == [str(tmp_path / "nowhere")]  # never the system copy, never another folder


# ---------------------------------------------------------------- the per-epoch console line

def test_the_epoch_line_shows_this_epochs_training_loss(tmp_path):
    import csv

    out = run_cli("kdx-train", "experiment=synthetic/teacher", "trainer.max_epochs=2", "data.train_size=128",
                  "trainer.progress_bar=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = {int(e): float(v) for e, v in
             re.findall(r"^epoch (\d)/2 .*train/loss_epoch (\d+\.\d{4})", out.stdout, flags=re.M)}
    with open(tmp_path / "run" / "metrics.csv") as f:
        logged = {int(r["epoch"]) + 1: float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")}
    assert set(shown) == {1, 2}, out.stdout[-2000:]  # the first epoch's line has a loss too
    assert all(shown[e] == pytest.approx(logged[e], abs=1e-4) for e in shown), (shown, logged)


# ---------------------------------------------------------------- what the help and the docs point at

def test_kdx_train_help_lists_every_console_script(tmp_path):
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    out = run_cli("kdx-train", "--help", cwd=tmp_path, timeout=60)
    assert out.returncode == 0
    other = out.stdout.split("Other commands", 1)[1].split("==", 1)[0]
    assert [s for s in scripts if s != "kdx-train" and s not in other] == []


def test_architecture_points_only_at_files_in_the_repository_or_says_otherwise():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for path in set(re.findall(r"`(?:python )?((?:\.\./)?[\w./-]+\.(?:py|toml|yaml))(?:[ `])", text)):
        if path.startswith("../"):
            assert "outside this repository" in text.split(path, 1)[1][:120], path
        elif "/" in path and "<" not in path and "*" not in path:
            assert (REPO / path).exists(), path


# ---------------------------------------------------------------- the GPU check on a machine without one

def test_gpu_check_on_a_cpu_machine_says_so_in_one_line_and_exits_0(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": str(Path(__import__("sys").executable))}
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().count("\n") == 0 and "no CUDA GPU on this machine" in done.stdout


# ---------------------------------------------------------------- one sentence with the fix, not a traceback

@pytest.mark.parametrize("args, sentence", [
    (["experiment=synthetic/teacher", "trainer=gpu"], "needs a CUDA GPU and torch sees none on this machine; use trainer=cpu"),
    (["experiment=folder/transfer"], "data.root must be set for this data config"),
    (["experiment=synthetic/kd", "teacher.ckpt=x.ckpt", "distill.temperature=1,4"],
     "distill.temperature=1,4 lists several values, which only a sweep runs: add -m"),
    (["experiment=synthetic/teacher", "task.network=student", "student.name=my_nets:Tiny"],
     "add its folder to PYTHONPATH"),
])
def test_common_mistakes_are_one_sentence_with_the_fix(tmp_path, args, sentence):
    import torch as _torch

    if "trainer=gpu" in args and _torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = run_cli("kdx-train", *args, *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert sentence in out.stderr and "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) == 1, out.stderr


def test_an_onnx_teachers_size_error_names_the_preprocess_key(tmp_path):
    from kdx.errors import ConfigError
    from kdx.models.onnx_teacher import OnnxEmbeddingModel

    torch.onnx.export(TanhColour(), torch.zeros(1, 3, 8, 8), str(tmp_path / "t.onnx"), dynamo=False,
                      input_names=["images"], output_names=["embedding"])
    with pytest.raises(ConfigError, match=r"^teacher\.preprocess\.input_size \(16, 16\) differs"):
        OnnxEmbeddingModel(tmp_path / "t.onnx", input_size=16)


# ---------------------------------------------------------------- W&B alone: metrics.csv, the lr, the sync hint

@pytest.mark.slow
def test_wandb_alone_keeps_metrics_csv_logs_the_lr_and_says_how_to_sync(tmp_path):
    run = tmp_path / "run"
    out = run_cli("kdx-train", "experiment=synthetic/teacher", "logger=wandb", "data.train_size=128", *FAST, "trainer.log_every_n_steps=1",
                  f"hydra.run.dir={run}", cwd=tmp_path, env={"WANDB_MODE": "offline"}, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(h.startswith("lr-") for h in header) and "val/acc1" in header, header
    results = json.loads((run / "results.json").read_text())
    assert f"upload this run with: {results['wandb']['sync']}" in out.stdout
