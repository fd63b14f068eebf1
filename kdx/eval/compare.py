"""Teacher vs student, side by side: cost, test accuracy and agreement with the teacher, as md/json/png."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from kdx.eval.profile import profile_models
from kdx.eval.robustness import calibration, robustness as robust_accuracy
from kdx.io import atomic_path, atomic_write_text, write_json
from kdx.text import markdown_table

# pipeline stage -> its row's label in the comparison tables (classification and face)
STAGE_LABELS = {"teacher": "teacher", "student": "student alone", "kd": "student distilled"}

# column key -> (header, format) of the comparison table, in display order
COLUMNS = {
    "model": ("model", "{}"), "architecture": ("architecture", "{}"), "params": ("params", "{:,}"),
    "macs": ("MACs", "{:,}"), "size_mb": ("size (MB)", "{:.2f}"), "latency_ms": ("latency b=1 (ms)", "{:.2f}"),
    "images_per_s": ("images/s b=64", "{:,.0f}"), "test_acc1": ("test top-1", "{:.4f}"),
    "agreement": ("agreement w/ teacher", "{:.4f}"), "ece": ("ECE", "{:.4f}"), "nll": ("NLL", "{:.4f}"),
    "acc_fgsm": ("top-1 FGSM", "{:.4f}"), "acc_pgd": ("top-1 PGD", "{:.4f}"), "acc_noise": ("top-1 noise", "{:.4f}"),
    "acc_blur": ("top-1 blur", "{:.4f}"), "onnx_latency_ms": ("onnxruntime b=1 (ms)", "{:.2f}"),
}


@torch.inference_mode()
def predict_logits(net: nn.Module, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of `net` over (x, y) batches, on the CPU in eval mode."""
    net = net.cpu().eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(net(x).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def predict(net: nn.Module, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and labels of `net` over (x, y) batches, on the CPU in eval mode."""
    logits, labels = predict_logits(net, batches)
    return logits.argmax(-1), labels


def compare_classifiers(models: Sequence[tuple[str, str, nn.Module]], batches: Sequence, input_shape: Sequence[int],
                        reference: str | None = None, robustness: dict[str, Any] | None = None,
                        **profile_kwargs: Any) -> list[dict[str, Any]]:
    """One row per (label, architecture, net): cost (timings interleaved between the models), test top-1,
    calibration (ECE, NLL, reliability bins) and agreement with the `reference` model; with `robustness`
    (keyword arguments of kdx.eval.robustness.robustness, `space` included) also accuracy under attacks and
    corruptions."""
    rows, predictions = [], {}
    costs = profile_models({label: net for label, _, net in models}, {label: input_shape for label, _, _ in models},
                           **profile_kwargs)
    for label, arch, net in models:
        logits, labels = predict_logits(net, batches)
        preds = logits.argmax(-1)
        predictions[label] = preds
        rows.append({"model": label, "architecture": arch, **costs[label],
                     "test_acc1": (preds == labels).float().mean().item(), **calibration(logits, labels)})
        if robustness:
            rows[-1].update(robust_accuracy(net, batches, **robustness))
    reference = reference or models[0][0]
    for row in rows:
        row["agreement"] = (predictions[row["model"]] == predictions[reference]).float().mean().item()
    return rows


SPREAD = {"latency_ms": ("latency_q1_ms", "latency_q3_ms"), "images_per_s": ("images_per_s_q1", "images_per_s_q3"),
          "onnx_latency_ms": ("onnx_latency_q1_ms", "onnx_latency_q3_ms")}


def spread_text(row: dict[str, Any], key: str, columns: dict[str, tuple[str, str]]) -> str:
    """`q1–q3` of a timing column, '' when the row has no interquartile range for it."""
    low, high = SPREAD.get(key, (None, None))
    if low is None or row.get(low) is None or row.get(high) is None:
        return ""
    fmt = columns[key][1]
    return f"{fmt.format(row[low])}–{fmt.format(row[high])}"


def cell(row: dict[str, Any], key: str, columns: dict[str, tuple[str, str]], spread: bool = True) -> str:
    """The text of one table cell; a timing with an interquartile range reads `median (q1–q3)`."""
    value = row.get(key)
    if value is None:
        return ""
    text = columns[key][1].format(value)
    iqr = spread_text(row, key, columns) if spread else ""
    return f"{text} ({iqr})" if iqr else text


def format_table(rows: Sequence[dict[str, Any]], columns: dict[str, tuple[str, str]] = COLUMNS) -> str:
    """A GitHub-markdown table of the rows."""
    keys = [k for k in columns if any(k in r for r in rows)]
    return markdown_table([columns[k][0] for k in keys], [[cell(r, k, columns) for k in keys] for r in rows])


def print_table(rows: Sequence[dict[str, Any]], title: str, columns: dict[str, tuple[str, str]] = COLUMNS,
                console: Any = None) -> None:
    """Print the rows as a rich table: one row per model when that fits the console, else one row per
    column (models side by side), so that no header or value is cut."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    keys = [k for k in columns if any(k in r for r in rows)]
    texts = {k: [cell(r, k, columns) for r in rows] for k in keys}
    wide = sum(max(len(columns[k][0]), *(len(t) for t in texts[k])) + 3 for k in keys) + 1
    if wide <= console.width:
        table = Table(title=title, box=box.SIMPLE_HEAD)
        for k in keys:
            table.add_column(columns[k][0], justify="left" if k in ("model", "architecture") else "right",
                             no_wrap=True)
        for i in range(len(rows)):
            table.add_row(*(texts[k][i] for k in keys))
    else:
        table = Table(title=title, box=box.SIMPLE_HEAD)
        table.add_column("", no_wrap=True)
        for name in texts.get("model", [str(i) for i in range(len(rows))]):
            table.add_column(name, justify="right")
        for k in keys:
            if k == "model":
                continue
            table.add_row(columns[k][0], *(cell(r, k, columns, spread=False) for r in rows))
            if any(spread_text(r, k, columns) for r in rows):
                table.add_row("  interquartile range", *(spread_text(r, k, columns) for r in rows))
    console.print(table)


def needs_log_scale(values: Sequence[float], ratio: float = 10.0) -> bool:
    """True when positive values span a factor of `ratio` or more (bars of the small ones would vanish)."""
    positive = [float(v) for v in values if v is not None and float(v) > 0]
    return len(positive) > 1 and max(positive) / min(positive) >= ratio


def plot_comparison(rows: Sequence[dict[str, Any]], path: Path, metric: str = "test_acc1",
                    metric_label: str = "test top-1") -> dict[str, str]:
    """A PNG with three bar charts: the metric, parameters and latency (median, interquartile range as error
    bars) of each model; a panel whose values span 10x or more uses a log scale. Returns each panel's scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"][: len(rows)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [(metric, metric_label, "{:.3f}"), ("params", "parameters", "{:,.0f}"),
              ("latency_ms", "CPU latency, batch 1 (ms): median, IQR", "{:.2f}")]
    scales = {}
    for ax, (key, title, fmt) in zip(axes, panels):
        values = [float(r.get(key) or 0) for r in rows]
        errors = None
        if key == "latency_ms" and all(r.get("latency_q1_ms") is not None for r in rows):
            errors = [[v - float(r["latency_q1_ms"]) for v, r in zip(values, rows)],
                      [float(r["latency_q3_ms"]) - v for v, r in zip(values, rows)]]
        bars = ax.bar(names, values, color=colors, yerr=errors, capsize=4 if errors else 0)
        scale = "log" if key != metric and needs_log_scale(values) else "linear"
        ax.set_yscale(scale)
        scales[key] = scale
        ax.set_title(title + (" (log scale)" if scale == "log" else ""), fontsize=10)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8,
                     padding=6 if errors else 2)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
        if scale == "linear":
            ax.margins(y=0.15)
        else:
            low = min(v for v in values if v > 0)
            ax.set_ylim(low / 3, max(values) * 4)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # an existing comparison plot stays whole until the new one is complete
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return scales


def plot_reliability(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """A reliability diagram: accuracy against mean confidence per confidence bin (bins holding at least 5
    images and 0.2% of them), one line per model, with the diagonal of perfect calibration; each model's ECE
    (over every bin) in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="perfectly calibrated")
    for row in rows:  # bins of a handful of images are noise, not calibration: they are left off the line
        every = row.get("reliability") or []
        least = max(5, int(0.002 * sum(b["count"] for b in every)))
        bins = [b for b in every if b["count"] >= least]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", markersize=3,
                label=f"{row['model']} (ECE {row.get('ece', float('nan')):.3f})")
    ax.set_xlabel("confidence (top softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("reliability on the test set (bins of 5+ images, 0.2%+ of them)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
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
    if any(r.get("reliability") for r in rows):
        paths["reliability"] = out_dir / "reliability.png"
        plot_reliability(rows, paths["reliability"])
    return paths
