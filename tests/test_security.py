"""Files from users are data, never code.

Every loader of a user-supplied file (teacher.ckpt, pretrained=FILE, kdx-eval models, .bin verification sets
through kdx-eval and data.val_bin, the checkpoint a run resumes from) is given a real payload, a pickle whose
__reduce__ writes a marker file, and must refuse it with one sentence without running it. A control test shows
that the same files do run their payload under a plain unpickler. kdx's own checkpoints load with
weights_only=True, and reports escape what they did not write.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_train, run_cli
from kdx.checkpoints import load_network, plain_checkpoint, read_checkpoint
from kdx.data.face_formats import read_verification_bin, write_verification_bin
from kdx.errors import CheckpointError, DataError
from kdx.cli import eval_main
from kdx.models import build_model


class Payload:
    """Unpickling this runs exec(), which writes `marker`: what a crafted file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A kdx-looking checkpoint (real resnet8 weights and metadata) that also carries the payload."""
    net = build_model("resnet8", num_classes=4)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "kdx": {"model_name": "resnet8", "num_classes": 4, "in_chans": 3, "network_prefix": "net."},
                "callbacks": {"x": Payload(marker)}}, path)
    return path


def evil_module_file(path: Path, marker: Path) -> Path:
    """A 'pickled whole model' file: torch.save of an arbitrary object."""
    torch.save(Payload(marker), path)
    return path


def jpeg_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def evil_bin(path: Path, marker: Path, variant: str = "list") -> Path:
    """An InsightFace-style .bin whose issame list (or a numpy object array) carries the payload."""
    images = [jpeg_bytes("red"), jpeg_bytes("blue")]
    flags = [Payload(marker)] if variant == "list" else np.array([Payload(marker)], dtype=object)
    path.write_bytes(pickle.dumps((images, flags), protocol=2))
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PAYLOAD_RAN"
    yield path


def test_the_payloads_are_real(tmp_path: Path) -> None:
    """Control: loaded the unsafe way, each crafted file runs its code (so the tests below can fail)."""
    for i, make in enumerate((evil_checkpoint, evil_module_file)):
        m = tmp_path / f"m{i}"
        torch.load(make(tmp_path / f"f{i}.ckpt", m), weights_only=False)
        assert m.read_text() == "payload ran"
    for variant in ("list", "numpy"):
        m = tmp_path / f"bin-{variant}"
        with open(evil_bin(tmp_path / f"{variant}.bin", m, variant), "rb") as f:
            pickle.load(f, encoding="bytes")
        assert m.is_file()


def test_checkpoint_loaders_refuse_code(tmp_path: Path, marker: Path) -> None:
    ckpt = evil_checkpoint(tmp_path / "teacher.ckpt", marker)
    whole = evil_module_file(tmp_path / "model.pt", marker)
    for call in (lambda: read_checkpoint(ckpt), lambda: load_network(ckpt, num_classes=4),
                 lambda: build_model("resnet8", num_classes=4, pretrained=str(whole)),
                 lambda: build_model("resnet8", num_classes=4, pretrained=str(ckpt))):
        with pytest.raises(CheckpointError, match=r"holds the Python object (builtins\.)?exec, which kdx never loads"):
            call()
    assert not marker.exists()


def test_kdx_train_teacher_ckpt_and_pretrained_refuse_code(tmp_path: Path, marker: Path) -> None:
    ckpt = evil_checkpoint(tmp_path / "teacher.ckpt", marker)
    whole = evil_module_file(tmp_path / "weights.pt", marker)
    for args in (["experiment=synthetic/kd", f"teacher.ckpt={ckpt}"],
                 ["experiment=synthetic/teacher", f"teacher.pretrained={whole}"]):
        out = run_cli("kdx-train", *args, "trainer.max_epochs=1", "trainer.progress_bar=none", cwd=tmp_path)
        assert out.returncode == 2, out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdx: error: ") and "Python object exec" in lines[0], out.stderr
        assert "Traceback" not in out.stderr
    assert not marker.exists()


def test_resume_from_a_crafted_checkpoint_refuses_code(tmp_path: Path, marker: Path) -> None:
    from kdx.train import run_training

    run_dir = tmp_path / "run"
    args = ["experiment=synthetic/teacher", "trainer.max_epochs=1", "trainer.progress_bar=none"]
    run_training(compose_train(args), run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({**results, "status": "running"}))  # as if killed
    evil_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
    out = run_cli("kdx-train", *args, f"resume={run_dir}", cwd=tmp_path)
    assert out.returncode == 2 and "last.ckpt holds the Python object exec" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not marker.exists()


def test_kdx_eval_refuses_code_in_models_and_bin_files(tmp_path: Path, marker: Path, capsys) -> None:
    faces = tmp_path / "faces"
    for i, colour in enumerate(("red", "green", "blue")):
        (faces / f"id{i}").mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (8, 8), colour).save(faces / f"id{i}" / f"{j}.png")
    for model in (evil_checkpoint(tmp_path / "m.ckpt", marker), evil_module_file(tmp_path / "m.pt", marker)):
        assert eval_main([str(model), str(faces), "--num-pairs", "10"]) == 2
    from test_face_eval_cli import export_mean_colour

    export_mean_colour(tmp_path / "good.onnx")
    for variant in ("list", "numpy"):
        assert eval_main([str(tmp_path / "good.onnx"), str(evil_bin(tmp_path / f"{variant}.bin", marker, variant)),
                          "--image-size", "8", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("kdx-eval: error: ") == 4 and "Python object builtins.exec" in err and "Traceback" not in err
    assert not marker.exists()


def test_bin_reader_refuses_code_and_still_reads_real_bins(tmp_path: Path, marker: Path) -> None:
    for variant in ("list", "numpy"):
        with pytest.raises(DataError, match=r"asks to load the Python object builtins\.exec"):
            read_verification_bin(evil_bin(tmp_path / f"{variant}.bin", marker, variant), image_size=(8, 8))
    # protocol-2 pickles spell bytes as _codecs.encode(text, 'latin1'); another codec is refused
    crafted = pickle.dumps(([b"a", b"b"], [True]), protocol=2).replace(b"latin1", b"rot_13")
    (tmp_path / "codec.bin").write_bytes(crafted)
    with pytest.raises(DataError, match="latin-1"):
        read_verification_bin(tmp_path / "codec.bin")
    assert not marker.exists()
    good = tmp_path / "good.bin"
    write_verification_bin(good, [jpeg_bytes("red"), jpeg_bytes("red"), jpeg_bytes("red"), jpeg_bytes("blue")],
                           [True, False])
    images, issame = read_verification_bin(good, image_size=(8, 8))
    assert images.shape == (4, 3, 8, 8) and issame.tolist() == [True, False]
    (tmp_path / "py2.bin").write_bytes(pickle.dumps(([bytearray(jpeg_bytes("red")) for _ in range(2)], np.array([True])),
                                                    protocol=2))
    assert read_verification_bin(tmp_path / "py2.bin", image_size=(8, 8))[1].tolist() == [True]


def test_data_val_bin_refuses_code(tmp_path: Path, marker: Path) -> None:
    from kdx.data.face import FaceRecordDataModule
    from kdx.data.pack import pack_identity_folder

    for i, colour in enumerate(("red", "blue")):
        (tmp_path / "ids" / f"p{i}").mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "ids" / f"p{i}" / f"{j}.png")
    pack_identity_folder(tmp_path / "ids", tmp_path / "rec")
    dm = FaceRecordDataModule(tmp_path / "rec", evil_bin(tmp_path / "val.bin", marker), image_size=8, num_workers=0)
    with pytest.raises(DataError, match="val.bin asks to load the Python object builtins.exec"):
        dm.setup("fit")
    assert not marker.exists()


# --------------------------------------------------------------------------- kdx's own checkpoints
def _all_load_weights_only(folder: Path) -> list[dict]:
    found = sorted(folder.rglob("*.ckpt"))
    assert found, f"no checkpoint under {folder}"
    return [torch.load(p, map_location="cpu", weights_only=True) for p in found]


def test_kdx_checkpoints_load_with_weights_only(tmp_path: Path, synthetic_teacher: Path) -> None:
    """Classification (supervised, distillation with trainable distiller parts, probe) and face checkpoints,
    best and last, load with plain torch.load(weights_only=True), and rebuild their network."""
    from kdx.train import run_training

    quiet = ["trainer.max_epochs=1", "trainer.progress_bar=none"]
    runs = {
        "distill": ["experiment=synthetic/kd", f"teacher.ckpt={synthetic_teacher}", "distill=crd",
                    "+distill.mix.fitnet.weight=1.0"],
        "probe": ["experiment=synthetic/probe", f"teacher.ckpt={synthetic_teacher}"],
        "face": ["experiment=orl/student", "+trainer.limit_train_batches=2", "data.val_identities=2",
                 "data.test_identities=2", "data.num_val_pairs=20", "data.num_test_pairs=20",
                 "task.bn_recalibration_batches=1", "student.kwargs.input_size=[32,32]"],
    }
    for name, overrides in runs.items():
        run_training(compose_train([*overrides, *quiet]), tmp_path / name)
    for ckpt in _all_load_weights_only(synthetic_teacher.parent) + _all_load_weights_only(tmp_path / "distill"):
        assert ckpt["kdx"]["model_name"] and "kdx.RandomState" in ckpt["callbacks"]
    assert any(k.startswith("distillers.") for k in _all_load_weights_only(tmp_path / "distill")[0]["state_dict"])
    _all_load_weights_only(tmp_path / "probe")
    face = _all_load_weights_only(tmp_path / "face")[0]
    assert face["kdx"]["task"] == "face"
    net, meta = load_network(tmp_path / "distill" / "checkpoints" / "best.ckpt")
    assert meta["model_name"] == "cnn_tiny"


def test_plain_checkpoint_makes_metadata_plain_and_refuses_code_in_training_state(tmp_path: Path) -> None:
    import enum

    from omegaconf import OmegaConf

    class Colour(enum.Enum):
        RED = "red"

    ckpt = {"state_dict": {"w": torch.ones(2)},
            "hyper_parameters": {"optim": OmegaConf.create({"lr": 0.1, "betas": [0.9, 0.99]}), "root": Path("/data"),
                                 "scale": np.float32(0.5), "colour": Colour.RED, "ids": {3, 1}},
            "kdx": {"model_name": "resnet8", "arr": np.arange(3)}}
    plain_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.ckpt")
    back = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert back["hyper_parameters"] == {"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "root": "/data", "scale": 0.5,
                                        "colour": "red", "ids": [1, 3]}
    assert torch.equal(back["kdx"]["arr"], torch.arange(3))
    with pytest.raises(CheckpointError, match=r"optimizer_states\[0\]\['fn'\] \(.*Colour\)"):
        plain_checkpoint({"state_dict": {}, "optimizer_states": [{"fn": Colour.RED}]})


# --------------------------------------------------------------------------- reports escape what they did not write
def test_reports_escape_markdown_html_terminal_and_formulas(tmp_path: Path) -> None:
    from kdx.cli import report_main

    sweep = tmp_path / "sweep"
    hostile = {
        "0": ["distill.temperature=4", "+note==HYPERLINK(\"http://evil\",\"x\")", "tag=<script>alert(1)</script>"],
        "1": ["distill.temperature=2", "tag=[click](javascript:alert(1))", "name=\x1b[31mred\x1b[0m[bold]x[/bold]"],
    }
    for job, overrides in hostile.items():
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides))
        (sweep / job / "results.json").write_text(json.dumps({
            "status": "completed", "task": "distill", "experiment": "@SUM(A1:A9)", "overrides": overrides,
            "hparams": {"pair": "p|q", "temperature": 4.0, "alpha": 0.5, "seed": 0},
            "metrics": {"val/acc1": 0.5 + int(job) / 10, "test/acc1": 0.4, "test/delta": -0.25},
            "monitor": {"metric": "val/acc1", "mode": "max"}}))
    (sweep / "2" / ".hydra").mkdir(parents=True)
    (sweep / "2" / "results.json").write_text(json.dumps({"status": "failed", "error": "-2+3 \x1b]0;title\x07 <b>x</b>",
                                                          "overrides": []}))
    import contextlib

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert report_main([str(sweep), "--no-plots"]) == 0
    md = (sweep / "report.md").read_text()
    import re

    outside = re.sub(r"(`+).*?\1", "", md)  # a code span (a value with a URL in it) shows its text literally
    for raw in ("<script>", "<b>", "\x1b", "\x07"):
        assert raw not in outside, raw
    assert "\x1b" not in md and "\x07" not in md

    assert not re.search(r"(?<!\\)\]\(javascript", md) and not re.search(r"(?<!\\)\|q", md)  # only escaped
    assert "&lt;b&gt;" in md and "\\[click\\]" in md and "p\\|q" in md and "\\x1b" in md
    terminal = stdout.getvalue()
    assert "\x1b" not in terminal and "\x07" not in terminal
    with open(sweep / "report.csv", newline="") as f:
        cells = [c for row in csv.reader(f) for c in row]
    for cell in cells:
        assert not cell.startswith(("=", "+", "@")) or cell.startswith("'"), cell
        if cell.startswith("-"):
            float(cell)  # only numbers may start with a minus sign
    assert "'@SUM(A1:A9)" in cells and "-0.25" in cells
    assert any(c.startswith("'-2+3") for c in cells)


# --------------------------------------------------------------------------- a file never chooses what is imported
EVIL_MODULE = """
from pathlib import Path
import torch.nn as nn

Path({marker!r}).write_text("module imported")


class Net(nn.Module):
    def __init__(self, num_classes=4, in_chans=3, embedding_size=8, input_size=8):
        super().__init__()
        self.fc = nn.Linear(in_chans, num_classes)
        self.embedding_size = embedding_size

    def forward(self, x):
        return self.fc(x.mean((2, 3)))
"""


def _module_checkpoint(path: Path, name: str, face: bool = False) -> Path:
    """A checkpoint whose metadata names `name` as its network (weights of a 3->4 linear layer)."""
    state = {"net.fc.weight": torch.zeros(4, 3), "net.fc.bias": torch.zeros(4)}
    meta = {"model_name": name, "num_classes": 4, "in_chans": 3, "network_prefix": "net.", "image_size": 8}
    if face:
        meta = {"task": "face", "num_classes": 4, "network_prefix": "net.",
                "embedding_model": {"name": name, "embedding_size": 8, "in_chans": 3, "input_size": 8}}
    torch.save({"state_dict": state, "kdx": meta}, path)
    return path


def test_a_checkpoint_naming_an_import_path_imports_nothing(tmp_path: Path, marker: Path, monkeypatch) -> None:
    from kdx.checkpoints import load_embedding_model, load_face_checkpoint

    (tmp_path / "evilmod.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))  # the README's PYTHONPATH=. pattern: the module is importable
    ckpt = _module_checkpoint(tmp_path / "c.ckpt", "evilmod:Net")
    face = _module_checkpoint(tmp_path / "f.ckpt", "evilmod.Net", face=True)
    for call in (lambda: load_network(ckpt), lambda: load_network(ckpt, num_classes=4),
                 lambda: load_embedding_model(face), lambda: load_face_checkpoint(face)):
        with pytest.raises(CheckpointError, match=r"names the model 'evilmod[:.]Net', an import path, and kdx never "
                                                  r"imports a module that a file names; .*--model-name evilmod"):
            call()
    assert not marker.exists()
    # the user names it: then it is their choice, and it is built
    net, meta = load_network(ckpt, model_name="evilmod:Net")
    assert marker.exists() and net(torch.zeros(1, 3, 8, 8)).shape == (1, 4)


def test_the_tasks_pass_the_configured_name_with_the_checkpoint_they_load(tmp_path: Path, marker: Path,
                                                                          monkeypatch) -> None:
    """teacher/student.ckpt with .name set to the checkpoint's import path: the task hands that name to the
    loader itself, whatever other configs this process checked (no reliance on the process-wide set)."""
    from kdx import schemas
    from kdx.schemas import ModelSpec
    from kdx.tasks.face import build_face_network
    from kdx.tasks.supervised import build_network

    (tmp_path / "evilmod.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = _module_checkpoint(tmp_path / "c.ckpt", "evilmod:Net")
    face = _module_checkpoint(tmp_path / "f.ckpt", "evilmod:Net", face=True)
    plain, named = ModelSpec(ckpt=str(ckpt)), ModelSpec(name="evilmod:Net", ckpt=str(ckpt))
    face_named = ModelSpec(name="evilmod:Net", ckpt=str(face))
    monkeypatch.setattr(schemas, "_CONFIGURED_MODEL_NAMES", set())
    with pytest.raises(CheckpointError, match="kdx never imports a module that a file names"):
        build_network(plain, num_classes=4, in_chans=3)
    with pytest.raises(CheckpointError, match="kdx never imports a module that a file names"):
        build_face_network(ModelSpec(ckpt=str(face)), in_chans=3, data_size=(8, 8))
    assert not marker.exists()
    net, meta = build_network(named, num_classes=4, in_chans=3)
    assert meta["model_name"] == "evilmod:Net" and net(torch.zeros(1, 3, 8, 8)).shape == (1, 4)
    with pytest.raises(CheckpointError, match="lacks 6 weights of evilmod:Net"):  # past the name: built, then checked
        build_face_network(face_named, in_chans=3, data_size=(8, 8))


def test_kdx_export_and_kdx_train_refuse_a_checkpoint_naming_a_module(tmp_path: Path, marker: Path) -> None:
    (tmp_path / "evilmod.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    ckpt = _module_checkpoint(tmp_path / "c.ckpt", "evilmod:Net")
    env = {"PYTHONPATH": str(tmp_path)}
    out = run_cli("kdx-export", str(ckpt), str(tmp_path / "out.onnx"), cwd=tmp_path, env=env)
    assert out.returncode == 2 and "--model-name evilmod:Net" in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and not marker.exists()
    out = run_cli("kdx-train", "experiment=synthetic/kd", f"teacher.ckpt={ckpt}", "trainer.max_epochs=1",
                  "trainer.progress_bar=none", cwd=tmp_path, env=env)
    assert out.returncode == 2 and "teacher.name=evilmod:Net" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not marker.exists()
    out = run_cli("kdx-export", str(ckpt), str(tmp_path / "out.pt"), "--model-name", "evilmod:Net", cwd=tmp_path,
                  env=env)
    assert out.returncode == 0, out.stderr[-2000:]  # named by the user: imported and exported
    assert marker.exists()


def test_a_checkpoint_naming_the_configured_import_path_still_loads(tmp_path: Path, monkeypatch) -> None:
    """teacher.name=my_nets:Net with teacher.ckpt=...: the config names it, so the checkpoint may use it."""
    from kdx.schemas import ModelSpec, check_section

    (tmp_path / "trusted_nets.py").write_text(EVIL_MODULE.format(marker=str(tmp_path / "imported")))
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = _module_checkpoint(tmp_path / "c.ckpt", "trusted_nets:Net")
    with pytest.raises(CheckpointError, match="import path"):
        load_network(ckpt)
    check_section({"name": "trusted_nets:Net", "ckpt": str(ckpt)}, ModelSpec, "teacher")
    net, _ = load_network(ckpt, num_classes=4)
    assert type(net).__name__ == "Net"


# --------------------------------------------------------------------------- what a file may ask to allocate
class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("ctor", [bytearray, bytes])
def test_a_bin_asking_for_a_huge_zero_buffer_is_refused(tmp_path: Path, ctor) -> None:
    path = tmp_path / "zeros.bin"
    path.write_bytes(pickle.dumps(([_Reduce(ctor, 8 << 30)], [True]), protocol=2))
    assert path.stat().st_size < 100  # a few dozen bytes asking for 8 GiB
    with pytest.raises(DataError, match=rf"asks for {ctor.__name__}\(8589934592\), a buffer of zeros"):
        read_verification_bin(path)


def test_a_bin_amplified_by_memo_references_is_refused(tmp_path: Path) -> None:
    image = jpeg_bytes("red")
    repeated = tmp_path / "repeated.bin"  # 20,000 references to one image: 40 KB of file, 750 MB decoded
    repeated.write_bytes(pickle.dumps(([image] * 20000, [True] * 10000), protocol=4))
    assert repeated.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"lists 20000 images but only 1 distinct"):
        read_verification_bin(repeated)
    big = b"x" * 100_000  # list(<the same 100 KB>) 2,000 times: 0.2 GB of list from a 110 KB file
    listed = tmp_path / "listed.bin"
    listed.write_bytes(pickle.dumps(([big] + [_Reduce(list, big) for _ in range(2000)], [True]), protocol=4))
    assert listed.stat().st_size < 130_000
    with pytest.raises(DataError, match="builds far more data than the file holds"):
        read_verification_bin(listed)


def test_a_checkpoint_with_an_absurd_class_count_is_one_sentence(tmp_path: Path) -> None:
    net = build_model("resnet8", num_classes=4)
    for count in (2_000_000_000, 0, -3, 2.5, "many"):
        path = tmp_path / "absurd.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                    "kdx": {"model_name": "resnet8", "num_classes": count, "in_chans": 3}}, path)
        with pytest.raises(CheckpointError, match=rf"records num_classes={count!r}, which is not a whole number in "
                                                  r"\[1, 1,000,000\]"):
            load_network(path)
    out = run_cli("kdx-export", str(path), str(tmp_path / "o.onnx"), cwd=tmp_path)
    assert out.returncode == 2 and "num_classes='many'" in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- dependency floors
def test_dependency_floors_exclude_releases_with_known_holes() -> None:
    """torch < 2.6 runs code through weights_only loads (CVE-2025-32434); onnx < 1.21 reads symlinked external
    data from outside the model folder (CVE-2026-27489). The floors, and what is installed, are above both."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = {(r := Requirement(d)).name: r.specifier for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]}
    for name, fixed in (("torch", "2.6"), ("onnx", "1.21"), ("torchvision", "0.21")):
        floors = [Version(s.version) for s in deps[name] if s.operator in (">=", "==", "~=")]
        assert floors and min(floors) >= Version(fixed), (name, str(deps[name]))
        assert not deps[name].contains(str(Version(fixed).release[0]) + "." + str(Version(fixed).release[1] - 1))
        assert Version(version(name).split("+")[0]) >= Version(fixed), (name, version(name))


def test_reports_do_not_autolink_urls_keep_no_escape_bytes_and_quote_semicolon_cells(tmp_path: Path) -> None:
    """GitHub turns bare URLs and e-mail addresses into links by itself: in report.md they are code spans;
    report.csv shows terminal escapes as text and guards cells starting with `;` (a list separator in many
    locales, after which a spreadsheet reads a new cell, possibly a formula)."""
    import re

    from kdx.cli import report_main

    sweep = tmp_path / "sweep"
    overrides = ["distill.temperature=4", "+note=see https://evil.example/x?a=1", "+who=admin@evil.example",
                 "+site=www.evil.example", "+cmd=;=cmd|' /C calc'!A0", "+esc=\x1b]8;;http://evil\x1b\\\\x\x1b]8;;\x1b\\\\"]
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides))
    (sweep / "0" / "results.json").write_text(json.dumps({
        "status": "completed", "task": "distill", "experiment": ";=1+2", "overrides": overrides,
        "hparams": {"pair": "https://evil.example/pair", "temperature": 4.0, "alpha": 0.5, "seed": 0},
        "metrics": {"val/acc1": 0.5, "test/acc1": 0.4}, "monitor": {"metric": "val/acc1", "mode": "max"}}))
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        assert report_main([str(sweep), "--no-plots"]) == 0
    md = (sweep / "report.md").read_text()
    # every URL, www. name and address sits inside a code span (GitHub links none of them there)
    outside = re.sub(r"(`+).*?\1", "", md)
    for bare in ("https://", "http://", "www.evil", "admin@evil"):
        assert bare in md and bare not in outside, bare
    raw = (sweep / "report.csv").read_bytes()
    assert b"\x1b" not in raw and b"\\x1b" in raw
    with open(sweep / "report.csv", newline="") as f:
        cells = [c for row in csv.reader(f) for c in row]
    assert "';'=1+2" in cells  # the leading `;` and the `=` after it (a new cell where `;` separates) both guarded
    assert not [c for c in cells if c.startswith((";", "=", "+", "@"))]
    # a reader whose separator is `;` starts a new cell after it: that cell never starts a formula
    with open(sweep / "report.csv", newline="") as f:
        for row in csv.reader(f, delimiter=";"):
            assert not any(c.lstrip().startswith(("=", "+", "@")) for c in row), row
