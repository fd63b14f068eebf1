"""metrics.csv of a run: rows trimmed back to a checkpoint before a resume, and the parts of a resumed DDP run
joined into one file."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from kdx.io import atomic_write_text


def trim_rows_after(run_dir: Path, global_step: int) -> None:
    """Before resuming from a checkpoint taken after `global_step` steps, drop the metrics.csv rows logged
    after it (the resumed run logs those steps again), and any row a kill cut short."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return
    text = path.read_text()
    if text and not text.endswith("\n"):  # a row the kill cut short (older files were appended in place)
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    columns = list(reader.fieldnames or [])

    def before(row: dict[str, Any]) -> bool:
        try:
            return int(float(row.get("step") or 0)) < global_step and None not in row.values()
        except ValueError:
            return False

    rows = [row for row in reader if before(row)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def merge_parts(run_dir: Path) -> None:
    """Join metrics.part-*.csv and metrics.csv into one metrics.csv (union of columns, rows in order)."""
    parts = sorted(run_dir.glob("metrics.part-*.csv"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not parts:
        return
    files = [*parts, *([run_dir / "metrics.csv"] if (run_dir / "metrics.csv").is_file() else [])]
    rows, columns = [], []
    for path in files:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            rows += list(reader)

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())
    for path in parts:
        path.unlink()
