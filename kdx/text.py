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
_FORMULA_START = ("=", "+", "-", "@", ";", "\t", "\r")
# a `;` (the list separator of many locales, where a reader starts a new cell after it) before a formula start
_AFTER_SEPARATOR = re.compile(r"(;\s*)([=+\-@])")
# what GitHub turns into a link by itself (GFM autolinks): a scheme and ://, www., mailto:/xmpp:, an e-mail address
_AUTOLINK = re.compile(r"(?i)[a-z][a-z0-9+.-]*://|\bwww\.|\b(?:mailto|xmpp):|[\w.+-]@[\w-]+\.[\w-]")


def visible_controls(text: str) -> str:
    """`text` with every control character shown as an escape (\\x1b, \\n, ...) instead of acting."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if m.group() not in "\t\n\r" else " ", text)


def code_span(text: str) -> str:
    """`text` as a Markdown code span (shown literally: no link, emphasis or HTML), its pipes escaped so that it
    stays in one table cell."""
    runs = [len(r) for r in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def markdown_text(value: Any) -> str:
    """`value` as inert Markdown: no links, images, code spans, emphasis, table cells or HTML can come of it.
    Text that GitHub would autolink (a bare URL, www., an e-mail address) is written as a code span, the one
    place where it is not turned into a link."""
    text = visible_controls(str(value))
    if _AUTOLINK.search(text):
        return code_span(text)
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
    """`value` for a CSV cell: control characters (terminal escapes) shown as text (\\x1b), and text that a
    spreadsheet would run as a formula (starting with =, +, -, @, ;, tab or carriage return) gets a leading
    apostrophe, as does a formula start after a `;` inside the text (where `;` is the list separator, a reader
    starts a new cell there); numbers are left as they are."""
    if not isinstance(value, str):
        return value
    text = _AFTER_SEPARATOR.sub(r"\1'\2", visible_controls(value))
    if (value.startswith(_FORMULA_START) or text.lstrip().startswith(_FORMULA_START)) and not _is_number(value):
        return "'" + text
    return text


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; every header and cell is made inert Markdown (markdown_text)."""
    lines = ["| " + " | ".join(markdown_text(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(markdown_text(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
