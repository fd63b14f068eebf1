"""A report value as the text of one table cell (Markdown, the terminal, the plots' labels)."""

from __future__ import annotations

import math
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """Short text for a table cell: numbers compact, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return str(value)
    return str(value)


def cell_text(value: Any) -> str:
    """A value as one line of at most 300 characters."""
    text = value if isinstance(value, str) else fmt(value)
    text = " ".join(text.split())
    return text[:297] + "..." if len(text) > 300 else text


def short_value(value: str, limit: int = 28) -> str:
    """An override value for the terminal: a long path keeps its last two parts (…/checkpoints/best.ckpt)."""
    if len(value) <= limit or "/" not in value:
        return value
    return "…/" + "/".join(value.rstrip("/").split("/")[-2:])
