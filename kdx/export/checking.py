"""Check that an exported file computes what the torch network computes.

`run_exported` runs random batches through the file (onnxruntime on the CPU, or the loaded TorchScript module),
`compare_outputs` measures the difference from torch (and, for classifiers, the top-1 agreement), and
`check_export` accepts max |torch - export| <= atol + rtol * max |torch output| or raises ExportCheckError.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kdx.errors import KdxError
from kdx.export.errors import ExportCheckError, first_line

CHECK_BATCHES = (1, 3, 8)  # batch sizes of the check with a dynamic batch axis (a fixed one: the traced size only)
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5  # of the largest |torch output|: float32 sums of large activations differ by more than atol


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporters' deprecation and tracer chatter (the check is what tells a good export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_exported(path: str | Path, fmt: str, batches: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The outputs of the exported file at `path` for each batch (onnxruntime on the CPU, or torch.jit.load)."""
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        onnx.checker.check_model(str(path))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return [np.asarray(session.run(None, {name: b.numpy()})[0]) for b in batches]
    with quiet_exporter(), torch.no_grad():
        module = torch.jit.load(str(path), map_location="cpu")
        module.eval()
        return [module(b).detach().float().numpy() for b in batches]


def compare_outputs(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], classify: bool) -> dict[str, Any]:
    """max_abs_diff over every batch, and for classifiers the top-1 agreement and the largest disagreeing margin."""
    diff, agree, total, worst_margin = 0.0, 0, 0, 0.0
    for e, g in zip(expected, got):
        if tuple(e.shape) != tuple(g.shape):
            return {"max_abs_diff": float("inf"), "agreement": 0.0 if classify else None,
                    "shape_mismatch": f"torch gives {tuple(e.shape)}, the export {tuple(g.shape)}"}
        diff = max(diff, float(np.max(np.abs(e.astype(np.float64) - g.astype(np.float64)))) if e.size else 0.0)
        if classify:
            te, tg = e.argmax(axis=1), g.argmax(axis=1)
            agree += int((te == tg).sum())
            total += int(te.shape[0])
            for row in np.nonzero(te != tg)[0]:  # a disagreement is only acceptable on a near-tie of torch's logits
                worst_margin = max(worst_margin, float(e[row, te[row]] - e[row, tg[row]]))
    report: dict[str, Any] = {"max_abs_diff": diff, "agreement": (agree / total if total else 1.0) if classify else None}
    if classify:
        report["disagreement_margin"] = worst_margin
    return report


def check_batches(shape: Sequence[int], dynamic_batch: bool, seed: int, fixed_batch: int) -> list[torch.Tensor]:
    """The random input batches of the check: CHECK_BATCHES' sizes, or twice `fixed_batch` for a fixed batch axis."""
    g = torch.Generator().manual_seed(seed)
    sizes = CHECK_BATCHES if dynamic_batch else (fixed_batch, fixed_batch)
    return [torch.randn(n, *shape, generator=g) for n in sizes]


def check_export(net: nn.Module, tmp: Path, fmt: str, desc: dict[str, Any], shape: Sequence[int], dynamic_batch: bool,
                 seed: int, atol: float, rtol: float, out_path: Path, fixed_batch: int) -> dict[str, Any]:
    """Run the export written to `tmp` against `net` on check_batches; the check's results, or ExportCheckError
    (naming `out_path`, the file the export is meant for) when it differs by more than atol + rtol x max |output|."""
    batches = check_batches(shape, dynamic_batch, seed, fixed_batch)
    with torch.no_grad():
        expected = [net(b).float().numpy() for b in batches]
    try:
        got = run_exported(tmp, fmt, batches)
    except KdxError:
        raise
    except Exception as e:
        raise ExportCheckError(f"the {fmt} export for {out_path} cannot be run ({type(e).__name__}: {first_line(e)}); "
                               f"it was not written") from None
    result = compare_outputs(expected, got, classify=desc["task"] == "classification")
    scale = max((float(np.max(np.abs(e))) for e in expected if e.size), default=0.0)
    tol = float(atol) + float(rtol) * scale
    result.update(checked=True, atol=float(atol), rtol=float(rtol), tolerance=tol,
                  batch_sizes=[int(b.shape[0]) for b in batches])
    if "shape_mismatch" in result:
        raise ExportCheckError(f"the {fmt} export for {out_path} gives outputs of another shape than torch "
                               f"({result['shape_mismatch']}); it was not written")
    if not result["max_abs_diff"] <= tol:
        raise ExportCheckError(f"the {fmt} export for {out_path} differs from torch by {result['max_abs_diff']:.3g} "
                               f"(max abs; tolerance {tol:.3g} = atol {atol:g} + rtol {rtol:g} x max |output| "
                               f"{scale:.3g}); it was not written")
    if result.get("disagreement_margin", 0.0) > 2 * tol:
        raise ExportCheckError(f"the {fmt} export for {out_path} picks another top-1 class than torch on "
                               f"{1 - result['agreement']:.1%} of the check images (not near-ties); it was not written")
    return result
