"""Heatmaps of a metric over temperature x alpha per pair (mean ± std over a cell's seeds), and a bar chart of the
best metric per pair (with the std over its configuration's seeds as an error bar, where it has several)."""

from __future__ import annotations

import re
from pathlib import Path

from kdx.io import atomic_path
from kdx.report.cells import fmt
from kdx.report.collect import JobRecord
from kdx.report.grids import Grid
from kdx.report.seeds import ConfigStats, pm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_TAG = "kdx-report"  # stored in each PNG's metadata so a rerun knows the file is its own
PAIRS_PNG = "pairs.png"


def safe_name(text: str) -> str:
    """`text` reduced to characters that are safe in a file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("->", "_to_")).strip("._")
    return name or "all"


def heatmap_names(pairs: list[str]) -> dict[str, str]:
    """File name `heatmap_<pair>.png` for each pair, made unique when two pairs sanitise alike."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for pair in pairs:
        base = f"heatmap_{safe_name(pair)}"
        name, n = f"{base}.png", 2
        while name in used:
            name, n = f"{base}_{n}.png", n + 1
        used.add(name)
        names[pair] = name
    return names


def is_kdx_png(path: Path) -> bool:
    """True when `path` is a PNG that kdx-report wrote (its metadata carries the kdx tag)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return head.startswith(PNG_MAGIC) and PNG_TAG.encode() in head


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Save `fig` as PNG with the kdx tag in its metadata."""
    with atomic_path(path) as tmp:  # an existing plot stays whole until the new one is complete
        fig.savefig(tmp, format="png", metadata={"Software": PNG_TAG, "Description": PNG_TAG})
    return path


def heatmap_png(grid: Grid, metric: str, mode: str, path: Path) -> Path:
    """Write a heatmap of `grid` (rows: temperature, columns: alpha) with every cell annotated (mean ± std and n
    where several jobs share it); with a student-alone baseline, each cell also shows its difference to it and
    the colour bar marks it."""
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in grid.means], dtype=float)
    several = any(n > 1 for row in grid.counts for n in row)  # wider cells for "mean ± std"
    fig = _figure(2.6 + (1.6 if several else 1.1) * len(grid.alphas), 1.8 + 0.8 * len(grid.temperatures))
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    base = grid.baseline.value if grid.baseline is not None else None
    masked = np.ma.masked_invalid(data)
    if base is None:
        cmap = colormaps["viridis" if mode == "max" else "viridis_r"].with_extremes(bad="#dddddd")
        image = ax.imshow(masked, cmap=cmap, aspect="auto", origin="lower")
        fig.colorbar(image, ax=ax, label=metric)
        shade = lambda v: 0.5 if hi == lo else (v - lo) / (hi - lo)  # noqa: E731
        dark = lambda v: (shade(v) if mode == "max" else 1 - shade(v)) <= 0.6  # noqa: E731
    else:  # diverging around the student alone: green cells beat it, red ones do not
        from matplotlib.colors import TwoSlopeNorm

        margin = max(hi - lo, abs(hi - base), abs(base - lo), 1e-6) * 0.05
        norm = TwoSlopeNorm(vcenter=base, vmin=min(lo, base - margin), vmax=max(hi, base + margin))
        cmap = colormaps["RdYlGn" if mode == "max" else "RdYlGn_r"].with_extremes(bad="#dddddd")
        image = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto", origin="lower")
        bar = fig.colorbar(image, ax=ax, label=metric)
        bar.ax.axhline(base, color="black", linewidth=1.5)
        dark = lambda v: abs(norm(v) - 0.5) > 0.35  # noqa: E731
    for i in range(len(grid.temperatures)):
        for k in range(len(grid.alphas)):
            mean, n = grid.means[i][k], grid.counts[i][k]
            if mean is None:
                ax.text(k, i, "-", ha="center", va="center", color="#666666")
                continue
            spread = pm(mean, grid.std(grid.temperatures[i], grid.alphas[k]))
            label = spread + (f"\nn={n}" if n > 1 else "") + (f"\n{mean - base:+.3f}" if base is not None else "")
            ax.text(k, i, label, ha="center", va="center", fontsize=9, color="white" if dark(mean) else "black")
    ax.set_xticks(range(len(grid.alphas)), [fmt(a) for a in grid.alphas])
    ax.set_yticks(range(len(grid.temperatures)), [fmt(t) for t in grid.temperatures])
    ax.set_xlabel("alpha")
    ax.set_ylabel("temperature")
    runs = len(grid.baseline.jobs) if grid.baseline is not None else 0
    ax.set_title(f"{grid.pair}: {metric}\n" + (f"student alone {fmt(base)}" + (f" ({runs} runs)" if runs > 1 else "")
                                                 + " = black line; cells: value, difference"
                                                 if base is not None else
                                                 "no student-alone baseline (kdx-report --baseline RUN)"), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def pairs_png(pairs: list[tuple[str, float, JobRecord]], metric: str, mode: str, path: Path,
              configs: list[ConfigStats] | None = None) -> Path:
    """Write a bar chart of the best `metric` per pair (best pair first), bars annotated; where the best job's
    configuration (`configs`, seeds.group_configs) has several seeds, its std over them is drawn as an error bar,
    so a reader sees how far one seed's value can be off."""
    labels = [p for p, _, _ in pairs]
    values = [v for _, v, _ in pairs]
    config_of = {id(job): c for c in configs or [] for job in c.jobs}
    spread = [config_of[id(j)] if id(j) in config_of and config_of[id(j)].n > 1 else None for _, _, j in pairs]
    errors = [c.std if c else 0.0 for c in spread] if any(spread) else None
    fig = _figure(max(4.0, 1.5 + 1.2 * len(labels)), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(labels)), values, color="#4c72b0", yerr=errors, capsize=4 if errors else 0)
    if bars:
        bars[0].set_color("#dd8452")  # the best pair
    for bar, value, c in zip(bars, values, spread):
        text = fmt(value) + (f"\nsd {fmt(c.std)}, n={c.n}" if c else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + (c.std if c else 0.0)),
                    ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
    tilt = len(labels) > 3 or max(len(x) for x in labels) > 12
    ax.set_xticks(range(len(labels)), labels, rotation=25 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel(metric)
    tops = [v + e for v, e in zip(values, errors or [0.0] * len(values))]
    lo, hi = min(values + [0.0]), max(tops + [0.0])
    ax.set_ylim(lo * 1.1 if lo < 0 else 0.0, hi * (1.2 if errors else 1.12) if hi > 0 else 1.0)
    ax.set_title(f"best {metric} per pair ({mode})" + ("\nerror bars: std over its configuration's seeds"
                                                       if errors else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
