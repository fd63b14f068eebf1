"""Teacher vs student, side by side: cost, test accuracy and agreement with the teacher, as md/json/png."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from kdx.eval.profile import profile_model
from kdx.io import atomic_write_text, write_json

# column key -> (header, format) of the comparison table, in display order
COLUMNS = {
    "model": ("model", "{}"), "architecture": ("architecture", "{}"), "params": ("params", "{:,}"),
    "macs": ("MACs", "{:,}"), "size_mb": ("size (MB)", "{:.2f}"), "latency_ms": ("latency b=1 (ms)", "{:.2f}"),
    "images_per_s": ("images/s b=64", "{:,.0f}"), "test_acc1": ("test top-1", "{:.4f}"),
    "agreement": ("agreement w/ teacher", "{:.4f}"),
}


@torch.inference_mode()
def predict(net: nn.Module, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and labels of `net` over (x, y) batches, on the CPU in eval mode."""
    net = net.cpu().eval()
    preds, labels = [], []
    for x, y in batches:
        preds.append(net(x).argmax(-1))
        labels.append(torch.as_tensor(y))
    return torch.cat(preds), torch.cat(labels)


def compare_classifiers(models: Sequence[tuple[str, str, nn.Module]], batches: Sequence, input_shape: Sequence[int],
                        reference: str | None = None, **profile_kwargs: Any) -> list[dict[str, Any]]:
    """One row per (label, architecture, net): profile, test top-1 and agreement with the `reference` model."""
    rows, predictions = [], {}
    for label, arch, net in models:
        preds, labels = predict(net, batches)
        predictions[label] = preds
        row = {"model": label, "architecture": arch, **profile_model(net, input_shape, **profile_kwargs),
               "test_acc1": (preds == labels).float().mean().item()}
        rows.append(row)
    reference = reference or models[0][0]
    for row in rows:
        row["agreement"] = (predictions[row["model"]] == predictions[reference]).float().mean().item()
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: dict[str, tuple[str, str]] = COLUMNS) -> str:
    """A GitHub-markdown table of the rows."""
    keys = [k for k in columns if any(k in r for r in rows)]
    lines = ["| " + " | ".join(columns[k][0] for k in keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for r in rows:
        cells = [columns[k][1].format(r[k]) if r.get(k) is not None else "" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], title: str, columns: dict[str, tuple[str, str]] = COLUMNS) -> None:
    """Print the rows as a rich table."""
    from rich.console import Console
    from rich.table import Table

    keys = [k for k in columns if any(k in r for r in rows)]
    table = Table(title=title)
    for k in keys:
        table.add_column(columns[k][0], justify="left" if k in ("model", "architecture") else "right")
    for r in rows:
        table.add_row(*[columns[k][1].format(r[k]) if r.get(k) is not None else "" for k in keys])
    console = Console()
    (console if console.is_terminal else Console(width=160)).print(table)


def plot_comparison(rows: Sequence[dict[str, Any]], path: Path, metric: str = "test_acc1",
                    metric_label: str = "test top-1") -> None:
    """A PNG with three bar charts: the metric, parameters and latency of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"][: len(rows)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [(metric, metric_label, "{:.3f}"), ("params", "parameters", "{:,.0f}"),
              ("latency_ms", "CPU latency, batch 1 (ms)", "{:.2f}")]
    for ax, (key, title, fmt) in zip(axes, panels):
        values = [float(r.get(key) or 0) for r in rows]
        bars = ax.bar(names, values, color=colors)
        ax.set_title(title)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(rows: Sequence[dict[str, Any]], out_dir: str | Path, title: str, extra: dict[str, Any] | None = None,
                     columns: dict[str, tuple[str, str]] = COLUMNS, metric: str = "test_acc1",
                     metric_label: str = "test top-1") -> dict[str, Path]:
    """Write comparison.md, comparison.json and comparison.png into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "comparison.md", "json": out_dir / "comparison.json", "png": out_dir / "comparison.png"}
    notes = "\n".join(f"- {k}: {v}" for k, v in (extra or {}).items())
    atomic_write_text(paths["md"], f"# {title}\n\n{format_table(rows, columns)}\n\n{notes}\n")
    write_json(paths["json"], {"title": title, "rows": list(rows), **({"notes": extra} if extra else {})})
    plot_comparison(rows, paths["png"], metric, metric_label)
    return paths
