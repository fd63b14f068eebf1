"""kdx-export: a trained classifier and a face student exported to ONNX and TorchScript, checked against torch,
described by the sidecar; bad input refused in one sentence; an existing output never damaged by a failed export."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import run_cli
from kdx.checkpoints import load_network
from kdx.errors import CheckpointError
from kdx.checkpoints import load_embedding_model
from kdx.cli import export_main
from kdx.export import ExportCheckError, ExportError, ExportExistsError, export_network, sidecar_path

ATOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:FutureWarning")


def _onnx_outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _leftovers(folder):
    """Temporary files an export left behind (kdx.io names them .<name>.tmp-<pid>-<random>)."""
    return [p.name for p in Path(folder).iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def face_ckpt(tmp_path_factory) -> Path:
    """A face checkpoint (cnn_tiny embedding net, 20 x 20 input, ArcFace head) after one real training step,
    written the way kdx-train writes it (AtomicCheckpointIO: plain metadata, read back with weights_only)."""
    import pytorch_lightning as pl
    from PIL import Image

    from kdx.data.face import FaceFolderDataModule
    from kdx.lit.face import FaceModule
    from kdx.models.embedding import build_embedding_model
    from kdx.train.trainer import AtomicCheckpointIO

    root = tmp_path_factory.mktemp("face_export")
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "ids" / f"id{i}").mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "ids" / f"id{i}" / f"{j}.png")
    dm = FaceFolderDataModule(str(root / "ids"), val_identities=2, num_val_pairs=4, batch_size=4, image_size=20, seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    net = build_embedding_model("cnn_tiny", 8, input_size=20)
    meta = {"name": "cnn_tiny", "embedding_size": 8, "in_chans": 3, "input_size": [20, 20], "kwargs": {},
            "class_names": list(dm.class_names)}
    module = FaceModule(net, dm.num_classes, model_meta=meta,
                        optim={"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"})
    trainer = pl.Trainer(default_root_dir=str(root), max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                         accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, enable_checkpointing=False, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(root / "face.ckpt")
    return root / "face.ckpt"


def test_classifier_exports_match_torch_and_sidecar_describes_them(synthetic_teacher, tmp_path):
    net, meta = load_network(synthetic_teacher)
    net.eval()
    shape = (meta["in_chans"], meta["image_size"], meta["image_size"])
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(7))  # not the batches the check used
    with torch.no_grad():
        expected = net(x).numpy()

    onnx_out = tmp_path / "student.onnx"
    report = export_network(synthetic_teacher, onnx_out, format="onnx", opset=17)
    assert report["checked"] and report["max_abs_diff"] <= ATOL and report["agreement"] == 1.0
    assert report["opset"] == 17 and report["out_bytes"] == onnx_out.stat().st_size > 0
    assert report["checkpoint_bytes"] == synthetic_teacher.stat().st_size
    assert report["batch_sizes"] == [1, 3, 8]  # the batch axis is dynamic: several sizes ran through the one file
    model = onnx.load(str(onnx_out))
    assert model.opset_import[0].version == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    got = _onnx_outputs(onnx_out, x)
    assert np.abs(got - expected).max() <= ATOL
    assert (got.argmax(1) == expected.argmax(1)).all()

    side = json.loads(sidecar_path(onnx_out).read_text())
    assert sidecar_path(onnx_out).name == "student.onnx.json"
    assert side["format"] == "onnx" and side["opset"] == 17 and side["task"] == "classification"
    assert side["architecture"] == meta["model_name"] and side["file"] == "student.onnx"
    assert side["class_names"] == list(meta["class_names"]) and side["num_classes"] == meta["num_classes"]
    assert side["input"] == {"name": "images", "shape": ["batch", *shape], "dtype": "float32", "layout": "NCHW"}
    assert side["output"] == {"name": "logits", "shape": ["batch", meta["num_classes"]]}
    assert "normalization" in side  # null: kdx's classifier checkpoints do not record it
    assert side["check"]["checked"] and side["check"]["max_abs_diff"] == report["max_abs_diff"]
    assert side["check"]["agreement"] == 1.0 and side["sizes_bytes"]["export"] == onnx_out.stat().st_size

    ts_out = tmp_path / "student.pt"
    report = export_network(synthetic_teacher, ts_out, format="torchscript")
    assert report["checked"] and report["max_abs_diff"] <= ATOL and report["opset"] is None
    loaded = torch.jit.load(str(ts_out))
    with torch.no_grad():
        assert np.abs(loaded(x).numpy() - expected).max() <= ATOL
    assert json.loads(sidecar_path(ts_out).read_text())["format"] == "torchscript"

    fixed = tmp_path / "fixed.onnx"
    report = export_network(synthetic_teacher, fixed, dynamic_batch=False)
    assert report["batch_sizes"] == [2, 2]
    assert onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert json.loads(sidecar_path(fixed).read_text())["input"]["shape"][0] == 2
    assert _leftovers(tmp_path) == []


def test_face_student_exports_its_embedding_network(face_ckpt, tmp_path):
    net = load_embedding_model(face_ckpt)
    x = torch.randn(4, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x).numpy()
    assert expected.shape == (4, 8)
    recorded = torch.load(face_ckpt, weights_only=True)["kdx"]["class_names"]
    for fmt, name in (("onnx", "face.onnx"), ("torchscript", "face.pt")):
        out = tmp_path / name
        report = export_network(face_ckpt, out, format=fmt)
        assert report["task"] == "face" and report["checked"] and report["max_abs_diff"] <= ATOL
        assert report["agreement"] is None  # no classes to agree on: an embedding
        if fmt == "onnx":
            got = _onnx_outputs(out, x)
        else:
            with torch.no_grad():
                got = torch.jit.load(str(out))(x).numpy()
        assert np.abs(got - expected).max() <= ATOL
        side = json.loads(sidecar_path(out).read_text())
        assert side["input"]["shape"] == ["batch", 3, 20, 20]
        assert side["output"] == {"name": "embedding", "shape": ["batch", 8]} and side["embedding_size"] == 8
        assert side["class_names"] == recorded and len(recorded) == 4  # training identities (2 of 6 held out)
        assert side["normalization"] == {"mean": 0.5, "std": 0.5}  # recorded by the face datamodule


def test_console_script_exports_and_refuses_an_existing_output(synthetic_teacher, tmp_path, capsys):
    out = tmp_path / "student.onnx"
    done = run_cli("kdx-export", str(synthetic_teacher), str(out), cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "check: max |torch - export|" in done.stdout
    assert out.is_file() and sidecar_path(out).is_file()
    assert json.loads(sidecar_path(out).read_text())["check"]["max_abs_diff"] <= ATOL
    before = out.read_bytes(), sidecar_path(out).read_bytes()
    # the same entry in-process (a second subprocess would cost seconds of imports): the output is refused
    code, err = _error_of(capsys, synthetic_teacher, out, "--format", "torchscript")
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"kdx-export: error: output {out} already exists;") and "--overwrite" in err
    assert (out.read_bytes(), sidecar_path(out).read_bytes()) == before


def test_onnx_and_torchscript_options_write_both(synthetic_teacher, tmp_path, capsys):
    """`kdx-export CKPT --onnx A --torchscript B`: both written and checked; no output named is an error."""
    a, b = tmp_path / "s.onnx", tmp_path / "s.pt"
    assert export_main([str(synthetic_teacher), "--onnx", str(a), "--torchscript", str(b)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {a}" in out and f"wrote {b}" in out and out.count("check: max |torch - export|") == 2
    assert json.loads(sidecar_path(b).read_text())["format"] == "torchscript"
    code, err = _error_of(capsys, synthetic_teacher)
    assert code == 2 and "name an output" in err


def _error_of(capsys, *argv):
    code = export_main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def test_bad_input_is_one_sentence_with_exit_code_2(synthetic_teacher, tmp_path, capsys):
    plain = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    text = tmp_path / "notes.ckpt"
    text.write_text("{}\n")
    out = tmp_path / "out.onnx"
    cases = [
        ((tmp_path / "missing.ckpt", out), "does not exist"),
        ((plain, out), "is not a kdx checkpoint"),
        ((text, out), "is not a kdx checkpoint (not a torch file at all)"),
        ((synthetic_teacher, out, "--format", "tflite"), "unknown export format 'tflite'; use onnx or torchscript"),
        ((synthetic_teacher, out, "--opset", "99"), "ONNX opset 99 is not supported"),
        ((synthetic_teacher, out, "--opset", "seventeen"), "--opset must be an integer"),
        ((synthetic_teacher, out, "--atol", "-1"), "atol must be a number >= 0"),
        ((synthetic_teacher, out, "--rtol", "x"), "--rtol must be a number"),
        ((synthetic_teacher, tmp_path, "--no-check"), "is a folder"),
    ]
    for argv, message in cases:
        code, err = _error_of(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("kdx-export: error: ") and message in err, (argv, err)
        assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not out.exists() and _leftovers(tmp_path) == []
    with pytest.raises(CheckpointError):
        export_network(plain, out)
    with pytest.raises(ExportError, match="unknown export format"):
        export_network(synthetic_teacher, out, format="tensorrt")


def test_failed_export_or_check_never_damages_the_existing_output(synthetic_teacher, tmp_path, monkeypatch, capsys):
    out = tmp_path / "student.onnx"
    out.write_bytes(b"the deployed model")
    sidecar_path(out).write_text('{"the": "deployed sidecar"}')
    old = out.read_bytes(), sidecar_path(out).read_bytes()

    with pytest.raises(ExportExistsError, match="already exists"):
        export_network(synthetic_teacher, out)
    assert (out.read_bytes(), sidecar_path(out).read_bytes()) == old

    def half_written(net, args, path, **kwargs):  # the exporter dies after writing part of its file
        Path(path).write_bytes(b"\x08\x07half an onnx file")
        raise RuntimeError("exporter crashed")

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", half_written)
        with pytest.raises(ExportError, match="failed .RuntimeError: exporter crashed"):
            export_network(synthetic_teacher, out, overwrite=True)
    assert (out.read_bytes(), sidecar_path(out).read_bytes()) == old and _leftovers(tmp_path) == []

    import kdx.export.checking

    real = kdx.export.checking.run_exported

    def drifting(path, fmt, batches):  # an export that computes something else than torch
        return [o + 0.01 for o in real(path, fmt, batches)]

    with monkeypatch.context() as m:
        m.setattr(kdx.export.checking, "run_exported", drifting)
        with pytest.raises(ExportCheckError) as e:
            export_network(synthetic_teacher, out, overwrite=True)
        assert str(out) in str(e.value) and "differs from torch by 0.01" in str(e.value)
        assert "tolerance" in str(e.value) and "atol 0.0001" in str(e.value)
        code, err = _error_of(capsys, synthetic_teacher, out, "--overwrite")
        assert code == 1 and "differs from torch" in err and err.strip().count("\n") == 0
    assert (out.read_bytes(), sidecar_path(out).read_bytes()) == old and _leftovers(tmp_path) == []

    report = export_network(synthetic_teacher, out, overwrite=True)  # a good export replaces both
    assert report["checked"] and out.read_bytes() != old[0]
    assert json.loads(sidecar_path(out).read_text())["file"] == "student.onnx"
    assert _onnx_outputs(out, torch.zeros(1, 3, 16, 16)).shape == (1, 4)

    no_check = export_network(synthetic_teacher, tmp_path / "unchecked.pt", format="torchscript", check=False)
    assert no_check["checked"] is False and no_check["max_abs_diff"] is None
