"""Text kdx writes for people: escaping of text kdx did not write itself (config values, job folders, error
messages) before it goes into a Markdown file, onto a terminal or into a CSV file that a spreadsheet may open,
and the one Markdown table writer (sweep reports, comparison tables)."""
from __future__ import annotations

import re
from typing import Any, Sequence

from rich.text import Text

# C0 and C1 control characters (ESC starts terminal control sequences) and DEL; tab and newline included
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Markdown punctuation that can start links, images, code, emphasis, tables or HTML-like markup
_MARKDOWN = re.compile(r"([\\`*\[\]|~])")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def visible_controls(text: str) -> str:
    """`text` with every control character shown as an escape (\\x1b, \\n, ...) instead of acting."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if m.group() not in "\t\n\r" else " ", text)


def markdown_text(value: Any) -> str:
    """`value` as inert Markdown: no links, images, code spans, emphasis, table cells or HTML can come of it."""
    text = visible_controls(str(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN.sub(r"\\\1", text)


def terminal_text(value: Any) -> str:
    """`value` with control sequences made visible, for plain print() to a terminal."""
    return visible_controls(str(value))


def rich_text(value: Any) -> Text:
    """`value` as a rich Text: no markup, emoji codes or control sequences are interpreted."""
    return Text(terminal_text(value))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_cell(value: Any) -> Any:
    """`value` for a CSV cell: text that a spreadsheet would run as a formula (starting with =, +, -, @, tab or
    carriage return) gets a leading apostrophe; numbers are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; every header and cell is made inert Markdown (markdown_text)."""
    lines = ["| " + " | ".join(markdown_text(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(markdown_text(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
