"""Export a trained kdx network (the student) to ONNX or TorchScript, and check that the export computes the same.

- `kdx.export.loading`: the network and its description rebuilt from a kdx checkpoint alone;
- `kdx.export.exporting`: `export_network(ckpt, out)`, the export through a temporary file and its `<out>.json`;
- `kdx.export.checking`: the export run against torch on random batches, within a tolerance;
- `kdx.export.errors`: the one-sentence errors.

`kdx-export CKPT OUT` (kdx.cli.export_main) is the console script.
"""
from kdx.export.checking import CHECK_BATCHES, DEFAULT_ATOL, DEFAULT_RTOL, compare_outputs, run_exported
from kdx.export.errors import ExportCheckError, ExportError, ExportExistsError
from kdx.export.exporting import EXPORT_BATCH, FORMATS, INPUT_NAME, SUFFIX_FORMATS, export_network, format_for
from kdx.export.loading import load_export_network
from kdx.io import sidecar_path

__all__ = [
    "CHECK_BATCHES", "DEFAULT_ATOL", "DEFAULT_RTOL", "EXPORT_BATCH", "ExportCheckError", "ExportError",
    "ExportExistsError", "FORMATS", "INPUT_NAME", "SUFFIX_FORMATS", "compare_outputs", "export_network", "format_for",
    "load_export_network", "run_exported", "sidecar_path",
]
