"""kdx-eval on a face folder and a .bin file with an ONNX model and a kdx face checkpoint."""
import json

import numpy as np
import torch
from PIL import Image

from kdx.data.face_formats import write_verification_bin
from kdx.checkpoints import load_embedding_model
from kdx.cli import eval_main


class MeanColour(torch.nn.Module):
    """Embedding = mean colour per channel + 1 (an identity's images share a colour)."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) + 1.0


def export_mean_colour(path) -> None:
    """MeanColour as an ONNX file (kdx-eval loads models as data: ONNX graphs or kdx checkpoints, never pickles)."""
    torch.onnx.export(MeanColour(), torch.zeros(1, 3, 8, 8), str(path), dynamo=False, input_names=["images"],
                      output_names=["embedding"], dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}})


def test_eval_cli_folder_and_bin(tmp_path, capsys):
    export_mean_colour(tmp_path / "model.onnx")
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    rng = np.random.default_rng(0)
    for i, c in enumerate(colours):
        (tmp_path / "faces" / f"id{i}").mkdir(parents=True)
        for j in range(4):
            arr = np.clip(np.array(c) + rng.integers(-10, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "faces" / f"id{i}" / f"{j}.png")
    out = tmp_path / "m.json"
    assert eval_main([str(tmp_path / "model.onnx"), str(tmp_path / "faces"), "--num-pairs", "40",
                      "--image-size", "16", "16", "--out", str(out), "--flip"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["accuracy"] == 1.0 and metrics["auc"] == 1.0
    assert "accuracy" in capsys.readouterr().out
    # 10 pairs: pair i is two images of one colour when i is even (same), of two colours when odd (different)
    order = [(i % 4, i % 4) if i % 2 == 0 else (i % 4, (i + 1) % 4) for i in range(10)]
    images = torch.tensor([colours[k] for pair in order for k in pair], dtype=torch.uint8)  # 20 images x RGB
    images = images[:, :, None, None].expand(20, 3, 8, 8).contiguous()
    issame = [i % 2 == 0 for i in range(10)]
    write_verification_bin(tmp_path / "v.bin", images, issame)
    assert eval_main([str(tmp_path / "model.onnx"), str(tmp_path / "v.bin"), "--image-size", "8", "8",
                      "--folds", "5", "--out", str(tmp_path / "bin.json")]) == 0
    record = json.loads((tmp_path / "bin.json").read_text())
    assert record["pairs"] == 10 and record["metrics"]["accuracy"] == 1.0 and record["metrics"]["auc"] == 1.0
    assert eval_main([str(tmp_path / "missing.pt"), str(tmp_path / "v.bin")]) == 2
    from kdx.models.onnx_teacher import OnnxEmbeddingModel

    assert isinstance(load_embedding_model(tmp_path / "model.onnx"), OnnxEmbeddingModel)


def test_load_kdx_face_checkpoint(tmp_path):
    from kdx.models import build_embedding_model

    net = build_embedding_model("mobilefacenet", 16, input_size=32).eval()
    spec = {"name": "mobilefacenet", "embedding_size": 16, "input_size": 32}
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "kdx": {"embedding_model": spec, "network_prefix": "net."}}, tmp_path / "face.ckpt")
    loaded = load_embedding_model(tmp_path / "face.ckpt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), net(x))
