"""The errors of kdx-export, each one sentence: bad arguments, an existing output, a failed check."""
from __future__ import annotations

from kdx.errors import KdxError


class ExportError(KdxError, ValueError):
    """An export cannot be made: bad arguments, a network the exporter cannot take, an existing output."""


class ExportExistsError(ExportError, FileExistsError):
    """The output file (or its sidecar) exists and overwrite was not asked for."""


class ExportCheckError(ExportError):
    """The exported file does not compute what the torch network computes."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for a one-sentence error."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
