"""Export a kdx checkpoint's network to ONNX or TorchScript, checked, with its `<out>.json` description.

`export_network(ckpt, out)` rebuilds the network (kdx.export.loading), exports it in eval mode for the input the
checkpoint records (in_chans x image size), writes it through a temporary file and a rename, checks it against
torch (kdx.export.checking) and writes `<out>.json` next to it: class names, input and output, normalisation
when the checkpoint records one, and the check's results.

An existing output is refused unless `overwrite=True`, and is replaced only by an export that is complete and
passed its check: a failed export or check leaves the earlier file as it was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from kdx.errors import KdxError
from kdx.export.checking import DEFAULT_ATOL, DEFAULT_RTOL, check_export, quiet_exporter
from kdx.export.errors import ExportError, ExportExistsError, first_line
from kdx.export.loading import load_export_network
from kdx.io import atomic_path, sidecar_path, write_json

FORMATS = ("onnx", "torchscript")
SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
                  ".jit": "torchscript", ".torchscript": "torchscript"}
INPUT_NAME = "images"
EXPORT_BATCH = 2  # batch size of the example input the network is traced with


def _opset_range() -> tuple[int, int]:
    try:
        from torch.onnx import _constants as c

        return int(getattr(c, "ONNX_MIN_OPSET", 7)), int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    except Exception:  # pragma: no cover - private module moved
        return 7, 20


def format_for(out_path: str | Path) -> str:
    """The format an output name implies: torchscript for .pt/.pth/.ts/.jit/.torchscript, else onnx."""
    return SUFFIX_FORMATS.get(Path(out_path).suffix.lower(), "onnx")


def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
                 output_name: str) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[output_name], dynamic_axes=dynamic_axes, do_constant_folding=True)


def _export_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    with quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
        traced = torch.jit.freeze(traced) if not traced.training else traced
        torch.jit.save(traced, str(path))


def export_network(ckpt_path: str | Path, out_path: str | Path, format: str = "onnx", opset: int = 17,
                   dynamic_batch: bool = True, check: bool = True, atol: float = DEFAULT_ATOL,
                   rtol: float = DEFAULT_RTOL, overwrite: bool = False, input_size: Sequence[int] | None = None,
                   seed: int = 0, log: Callable[[str], None] | None = None,
                   model_name: str | None = None) -> dict[str, Any]:
    """Export the network of a kdx checkpoint to `out_path` (ONNX or TorchScript), check it, write `<out>.json`.
    `model_name`: the network's import path when the checkpoint records one (kdx.checkpoints.checked_model_name).

    Returns the report: paths, sizes in bytes, max_abs_diff between torch and the export over random batches,
    top-1 agreement (classifiers), opset. The check accepts max_abs_diff <= atol + rtol * max |torch output|.
    Raises CheckpointError for a missing or non-kdx checkpoint, ExportExistsError when `out_path` or its sidecar
    exists and `overwrite` is false, ExportError for bad arguments or an exporter failure, and ExportCheckError
    when the export differs by more than that tolerance. On any error the existing output and sidecar are left
    as they were and no temporary file remains.
    """
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use onnx or torchscript")
    lo, hi = _opset_range()
    if fmt == "onnx" and (isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not lo <= opset <= hi):
        raise ExportError(f"ONNX opset {opset!r} is not supported by the exporter; use an opset from {lo} to {hi}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ExportError(f"the check tolerance {name} must be a number >= 0, got {value!r}")
    ckpt_path, out_path = Path(ckpt_path).expanduser(), Path(out_path).expanduser()
    side = sidecar_path(out_path)
    if out_path.is_dir():
        raise ExportError(f"output {out_path} is a folder; pass a file name such as {out_path / 'student.onnx'}")
    if not overwrite:
        for existing in (out_path, side):
            if existing.exists():
                raise ExportExistsError(f"output {existing} already exists; choose another name, or replace it "
                                        f"with --overwrite (overwrite=True in Python)")
    net, desc = load_export_network(ckpt_path, input_size, model_name)
    say = log or (lambda _msg: None)
    shape = desc["input_shape"]
    example = torch.randn(EXPORT_BATCH, *shape, generator=torch.Generator().manual_seed(seed + 1))
    try:
        with torch.no_grad():
            probe = net(example)
    except Exception as e:
        raise ExportError(f"{desc['architecture']} from {ckpt_path} fails on a {tuple(example.shape)} input "
                          f"({type(e).__name__}: {first_line(e)}); pass the input size it was trained for "
                          f"(--input-size H W)") from None
    if not isinstance(probe, torch.Tensor):
        raise ExportError(f"{desc['architecture']} from {ckpt_path} returns a {type(probe).__name__}, not one tensor; "
                          f"only single-output networks can be exported")
    report: dict[str, Any] = {"checkpoint": str(ckpt_path), "out": str(out_path), "sidecar": str(side), "format": fmt,
                              "opset": int(opset) if fmt == "onnx" else None, "task": desc["task"],
                              "architecture": desc["architecture"], "input_shape": shape,
                              "dynamic_batch": bool(dynamic_batch), "checkpoint_bytes": ckpt_path.stat().st_size}
    with atomic_path(out_path) as tmp:  # `out_path` is replaced only when everything below succeeded
        say(f"exporting {desc['architecture']} ({desc['task']}) to {fmt}")
        try:
            if fmt == "onnx":
                _export_onnx(net, example, tmp, int(opset), dynamic_batch, desc["output_name"])
            else:
                _export_torchscript(net, example, tmp)
        except KdxError:
            raise
        except Exception as e:
            raise ExportError(f"exporting {desc['architecture']} from {ckpt_path} to {fmt} failed "
                              f"({type(e).__name__}: {first_line(e)})") from None
        if not tmp.is_file():
            raise ExportError(f"the {fmt} exporter wrote nothing for {desc['architecture']} from {ckpt_path}")
        report["out_bytes"] = tmp.stat().st_size
        if check:
            report.update(check_export(net, tmp, fmt, desc, shape, dynamic_batch, seed, atol, rtol, out_path,
                                        EXPORT_BATCH))
            say(f"checked: max |torch - {fmt}| = {report['max_abs_diff']:.3g}"
                + (f", top-1 agreement {report['agreement']:.4f}" if report.get("agreement") is not None else ""))
        else:
            report.update(checked=False, max_abs_diff=None, agreement=None, atol=float(atol), rtol=float(rtol),
                          tolerance=None)
        # the sidecar goes first (atomically too): if it cannot be written, the old model stays with its old sidecar
        write_json(side, _sidecar(out_path, ckpt_path, desc, report, probe, dynamic_batch))
    report["sidecar_bytes"] = side.stat().st_size
    return report


def _sidecar(out_path: Path, ckpt_path: Path, desc: dict[str, Any], report: dict[str, Any], probe: torch.Tensor,
             dynamic_batch: bool) -> dict[str, Any]:
    """The `<out>.json` description: what the file takes and returns, the classes, normalisation and the check."""
    batch = "batch" if dynamic_batch else EXPORT_BATCH
    sidecar = {"file": out_path.name, "format": report["format"], "opset": report["opset"], "task": desc["task"],
               "architecture": desc["architecture"], "checkpoint": str(ckpt_path),
               "input": {"name": INPUT_NAME, "shape": [batch, *desc["input_shape"]], "dtype": "float32",
                         "layout": "NCHW"},
               "output": {"name": desc["output_name"], "shape": [batch, *map(int, probe.shape[1:])]},
               "class_names": desc["class_names"], "num_classes": desc["num_classes"],
               "normalization": desc["normalization"],
               "check": {k: report.get(k) for k in ("checked", "max_abs_diff", "agreement", "atol", "rtol", "tolerance",
                                                    "batch_sizes")},
               "sizes_bytes": {"checkpoint": report["checkpoint_bytes"], "export": report["out_bytes"]},
               "torch": torch.__version__}
    if desc["task"] == "face":
        sidecar["embedding_size"] = desc.get("embedding_size")
    return sidecar
