"""Export a trained kdx network (the student) to ONNX or TorchScript, and check that the export computes the same.

`export_network(ckpt, out)` rebuilds the network from the kdx checkpoint alone (a classifier through
`kdx.checkpoints.load_network`, a face embedding net through `kdx.checkpoints.load_embedding_model`), exports it in
eval mode for the input the checkpoint records (in_chans x image size), writes it through a temporary file and a
rename, runs the same random batches through torch and through the exported file (onnxruntime, or the loaded
TorchScript module), and writes `<out>.json` next to it: class names, input and output, normalisation when the
checkpoint records one, and the check's results. `kdx-export CKPT OUT` is the console script.

An existing output is refused unless `overwrite=True`, and is replaced only by an export that is complete and
passed its check: a failed export or check leaves the earlier file as it was.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from kdx.checkpoints import load_embedding_model, load_network, read_checkpoint
from kdx.errors import CheckpointError, KdxError
from kdx.io import atomic_path, sidecar_path, write_json

FORMATS = ("onnx", "torchscript")
SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
                  ".jit": "torchscript", ".torchscript": "torchscript"}
INPUT_NAME = "images"
EXPORT_BATCH = 2  # batch size of the example input the network is traced with
CHECK_BATCHES = (1, 3, 8)  # batch sizes of the check with a dynamic batch axis (the fixed one: EXPORT_BATCH only)
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5  # of the largest |torch output|: float32 sums of large activations differ by more than atol


class ExportError(KdxError, ValueError):
    """An export cannot be made: bad arguments, a network the exporter cannot take, an existing output."""


class ExportExistsError(ExportError, FileExistsError):
    """The output file (or its sidecar) exists and overwrite was not asked for."""


class ExportCheckError(ExportError):
    """The exported file does not compute what the torch network computes."""


def _opset_range() -> tuple[int, int]:
    try:
        from torch.onnx import _constants as c

        return int(getattr(c, "ONNX_MIN_OPSET", 7)), int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    except Exception:  # pragma: no cover - private module moved
        return 7, 20


def format_for(out_path: str | Path) -> str:
    """The format an output name implies: torchscript for .pt/.pth/.ts/.jit/.torchscript, else onnx."""
    return SUFFIX_FORMATS.get(Path(out_path).suffix.lower(), "onnx")


# ---------------------------------------------------------------------------------------------- rebuilding
def _hw(size: Any, where: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        return int(size[0]), int(size[1])
    raise ExportError(f"{where} records the image size {size!r}, which is not an int or [H, W]; pass input_size=(H, W) "
                      f"(--input-size H W)")


def _normalization(ckpt: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any] | None:
    """{"mean": [...], "std": [...]} when the checkpoint records the input normalisation, else None."""
    places = [meta, meta.get("embedding_model") or {}, ckpt.get("datamodule_hyper_parameters") or {}]
    for place in places:
        if not isinstance(place, dict):
            continue
        for key in ("normalization", "normalisation", "normalize"):
            value = place.get(key)
            if isinstance(value, dict) and "mean" in value and "std" in value:
                return {"mean": _plain(value["mean"]), "std": _plain(value["std"])}
        for mean_key, std_key in (("mean", "std"), ("data_mean", "data_std")):
            if place.get(mean_key) is not None and place.get(std_key) is not None:
                return {"mean": _plain(place[mean_key]), "std": _plain(place[std_key])}
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist() if value.numel() != 1 else value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_export_network(ckpt_path: str | Path, input_size: Sequence[int] | None = None,
                        model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(network in eval mode, description) of a kdx checkpoint: a classifier or a face embedding net.

    The description holds task, architecture, input shape (C, H, W), output name, class names and the
    normalisation when recorded. Raises CheckpointError for a missing, unreadable or non-kdx file.
    """
    path = Path(ckpt_path).expanduser()
    if path.is_file():  # say "not a checkpoint" for an ONNX, JSON or image file, rather than an unpickling error
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or legacy pickle
            raise CheckpointError(f"{path} is not a kdx checkpoint (not a torch file at all); pass a checkpoint "
                                  f"written by kdx-train (<run>/checkpoints/best.ckpt)")
    ckpt = read_checkpoint(path)  # missing / unreadable / code-carrying files: CheckpointError, one sentence
    meta = ckpt.get("kdx")
    if not isinstance(meta, dict) or not ("model_name" in meta or "embedding_model" in meta):
        raise CheckpointError(f"{path} is not a kdx checkpoint (it has no kdx section naming the network); pass a "
                              f"checkpoint written by kdx-train (<run>/checkpoints/best.ckpt)")
    if "embedding_model" in meta:  # a face run: the embedding network, without its margin head
        spec = meta["embedding_model"]
        net = load_embedding_model(path, model_name)
        task, arch, output = "face", str(spec.get("name")), "embedding"
        in_chans = int(spec.get("in_chans", 3))
        size = input_size if input_size is not None else spec.get("input_size", getattr(net, "input_size", None))
    else:
        net, meta = load_network(path, model_name=model_name)
        task, arch, output = "classification", str(meta["model_name"]), "logits"
        in_chans = int(meta.get("in_chans", 3))
        size = input_size if input_size is not None else meta.get("image_size")
    if size is None:
        raise ExportError(f"{path} records no input image size; pass input_size=(H, W) (--input-size H W)")
    h, w = _hw(list(size) if isinstance(size, tuple) else size, str(path))
    desc = {"task": task, "architecture": arch, "input_shape": [in_chans, h, w], "output_name": output,
            "class_names": [str(c) for c in (meta.get("class_names") or [])],
            "num_classes": int(meta["num_classes"]) if meta.get("num_classes") is not None else None,
            "normalization": _normalization(ckpt, meta)}
    if task == "face":
        desc["embedding_size"] = int(meta["embedding_model"].get("embedding_size", 0)) or None
    return net.eval(), desc


# ---------------------------------------------------------------------------------------------- exporting
@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' deprecation and tracer chatter (the check below is what tells a good export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
                 output_name: str) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[output_name], dynamic_axes=dynamic_axes, do_constant_folding=True)


def _export_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(net, example, check_trace=False)
        traced = torch.jit.freeze(traced) if not traced.training else traced
        torch.jit.save(traced, str(path))


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
    with _quiet_exporter(), torch.no_grad():
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


def _check_batches(shape: Sequence[int], dynamic_batch: bool, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = CHECK_BATCHES if dynamic_batch else (EXPORT_BATCH, EXPORT_BATCH)
    return [torch.randn(n, *shape, generator=g) for n in sizes]


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
                          f"({type(e).__name__}: {_first_line(e)}); pass the input size it was trained for "
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
                              f"({type(e).__name__}: {_first_line(e)})") from None
        if not tmp.is_file():
            raise ExportError(f"the {fmt} exporter wrote nothing for {desc['architecture']} from {ckpt_path}")
        report["out_bytes"] = tmp.stat().st_size
        if check:
            report.update(_check(net, tmp, fmt, desc, shape, dynamic_batch, seed, atol, rtol, out_path))
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


def _check(net: nn.Module, tmp: Path, fmt: str, desc: dict[str, Any], shape: Sequence[int], dynamic_batch: bool,
           seed: int, atol: float, rtol: float, out_path: Path) -> dict[str, Any]:
    batches = _check_batches(shape, dynamic_batch, seed)
    with torch.no_grad():
        expected = [net(b).float().numpy() for b in batches]
    try:
        got = run_exported(tmp, fmt, batches)
    except KdxError:
        raise
    except Exception as e:
        raise ExportCheckError(f"the {fmt} export for {out_path} cannot be run ({type(e).__name__}: {_first_line(e)}); "
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


# ---------------------------------------------------------------------------------------------- console script
def export_main(argv: list[str] | None = None) -> int:
    """Console entry `kdx-export CKPT OUT`: export a kdx checkpoint's network to ONNX or TorchScript and check it."""
    p = argparse.ArgumentParser(prog="kdx-export", description=export_main.__doc__)
    p.add_argument("ckpt", help="a checkpoint written by kdx-train (classifier or face run)")
    p.add_argument("out", nargs="?", default=None,
                   help="the file to write (.onnx, or .pt/.ts for TorchScript); <OUT>.json is written beside it")
    p.add_argument("--onnx", default=None, metavar="OUT", help="write an ONNX export to OUT (with or instead of OUT)")
    p.add_argument("--torchscript", default=None, metavar="OUT", help="write a TorchScript export to OUT")
    p.add_argument("--format", default=None, help="onnx or torchscript (default: from OUT's ending, else onnx)")
    p.add_argument("--opset", default="17", help="ONNX opset (default 17)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input height and width (default: the size the checkpoint records)")
    p.add_argument("--static-batch", action="store_true", help=f"fix the batch size to {EXPORT_BATCH} (default: dynamic)")
    p.add_argument("--atol", default=str(DEFAULT_ATOL), help=f"accepted |torch - export|: atol + rtol x max |torch output| "
                   f"(default atol {DEFAULT_ATOL:g})")
    p.add_argument("--rtol", default=str(DEFAULT_RTOL), help=f"see --atol (default {DEFAULT_RTOL:g})")
    p.add_argument("--no-check", action="store_true", help="skip running the export against torch")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the network's import path (my_nets:TinyNet) when the checkpoint records one: a file never "
                        "chooses a module to import, so you name it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new one is checked)")
    args = p.parse_args(argv)
    jobs = ([(args.out, args.format if args.format is not None else format_for(args.out))] if args.out else []) + \
        ([(args.onnx, "onnx")] if args.onnx else []) + ([(args.torchscript, "torchscript")] if args.torchscript else [])
    if not jobs:
        print("kdx-export: error: name an output: kdx-export CKPT OUT, or --onnx OUT and/or --torchscript OUT",
              file=sys.stderr)
        return 2
    reports = []
    try:
        try:
            opset = int(args.opset)
        except ValueError:
            raise ExportError(f"--opset must be an integer, got {args.opset!r}") from None
        tolerances = {}
        for name in ("atol", "rtol"):
            try:
                tolerances[name] = float(getattr(args, name))
            except ValueError:
                raise ExportError(f"--{name} must be a number, got {getattr(args, name)!r}") from None
        for out, fmt in jobs:
            reports.append(export_network(args.ckpt, out, format=fmt, opset=opset,
                                          dynamic_batch=not args.static_batch, check=not args.no_check, **tolerances,
                                          overwrite=args.overwrite, input_size=args.input_size,
                                          model_name=args.model_name))
    except ExportCheckError as e:
        print(f"kdx-export: error: {e}", file=sys.stderr)
        return 1
    except KdxError as e:
        print(f"kdx-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdx-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    for report in reports:
        print(f"wrote {report['out']} ({report['out_bytes']:,} bytes, {report['format']}"
              + (f", opset {report['opset']}" if report["opset"] is not None else "") + ")")
        print(f"wrote {report['sidecar']}")
        if report.get("checked"):
            line = f"check: max |torch - export| = {report['max_abs_diff']:.3g} (tolerance {report['tolerance']:.3g})"
            if report.get("agreement") is not None:
                line += f", top-1 agreement {report['agreement']:.4f}"
            print(line + f" on batches of {report['batch_sizes']}")
        else:
            print("check: skipped (--no-check)")
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
