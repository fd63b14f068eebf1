"""Rank jobs by a metric and render them as CSV, Markdown and rich tables."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kdx.errors import KdxError
from kdx.report.collect import HPARAM_KEYS, JobRecord, is_nan, natural_key, to_float

MARKER = "<!-- kdx-report -->"
CSV_HEAD = ("rank", "job", "status")  # every kdx report.csv header starts with these
DEFAULT_METRIC = "test/acc1"
MODES = ("max", "min")
_MIN_TOKENS = {"loss", "err", "error", "eer", "fnmr", "fmr", "fpr", "fnr", "mse", "mae", "nll", "ppl"}


# ----------------------------------------------------------------------------- metric choice


def available_metrics(jobs: Iterable[JobRecord]) -> list[str]:
    """Metric names found in any job, in order of first appearance."""
    seen: dict[str, None] = {}
    for job in jobs:
        for key in job.metrics:
            seen.setdefault(key, None)
    return list(seen)


def choose_metric(jobs: list[JobRecord], metric: str | None = None, root: Any = "") -> str | None:
    """The ranking metric: `metric` if given (must exist), else test/acc1, monitor.metric or the first found."""
    names = available_metrics(jobs)
    if metric is not None:
        if metric not in names:
            listed = ", ".join(names) if names else "none (no job finished with metrics)"
            raise KdxError(
                f"no job under {root} has metric {metric!r}; pass --metric with one of: {listed}."
            )
        return metric
    done = [j for j in jobs if j.ok and j.metrics] or [j for j in jobs if j.metrics]
    if not done:
        return None
    if sum(DEFAULT_METRIC in j.metrics for j in done) * 2 > len(done):
        return DEFAULT_METRIC
    monitors = Counter(
        j.monitor.get("metric") for j in done
        if isinstance(j.monitor.get("metric"), str) and j.monitor.get("metric") in names
    )
    if monitors:
        return monitors.most_common(1)[0][0]
    return available_metrics(done)[0]


def choose_mode(jobs: list[JobRecord], metric: str | None, mode: str | None = None) -> str:
    """`mode` if given, else the jobs' monitor.mode for this metric, else min for loss/error-like names."""
    if mode is not None:
        if mode not in MODES:
            raise KdxError(f"--mode {mode!r} is not valid; pass --mode max or --mode min.")
        return mode
    if metric is None:
        return "max"
    modes = Counter(
        j.monitor.get("mode") for j in jobs
        if j.monitor.get("metric") == metric and j.monitor.get("mode") in MODES
    )
    if modes:
        return modes.most_common(1)[0][0]
    tokens = set(re.split(r"[^a-z0-9]+", metric.lower().rsplit("/", 1)[-1]))
    return "min" if tokens & _MIN_TOKENS else "max"


# ----------------------------------------------------------------------------- ranking


def metric_value(job: JobRecord, metric: str | None) -> float | None:
    """The job's value of `metric`, None when missing or NaN."""
    if metric is None:
        return None
    value = job.metrics.get(metric)
    return None if is_nan(value) else value


def rank_jobs(
    jobs: list[JobRecord], metric: str | None, mode: str = "max"
) -> tuple[list[JobRecord], list[JobRecord]]:
    """(completed jobs best first, jobs that failed or did not finish); jobs without the metric go last."""
    done = [j for j in jobs if j.ok]
    failed = [j for j in jobs if not j.ok]
    sign = -1.0 if mode == "max" else 1.0

    def key(job: JobRecord) -> tuple[Any, ...]:
        """Missing metric last, then best value first, then job folder."""
        value = metric_value(job, metric)
        return (value is None, 0.0 if value is None else sign * value, natural_key(job.rel))

    return sorted(done, key=key), sorted(failed, key=lambda j: natural_key(j.rel))


def best_job(ranked: list[JobRecord], metric: str | None) -> JobRecord | None:
    """The top ranked job, if it has the metric."""
    return ranked[0] if ranked and metric_value(ranked[0], metric) is not None else None


# ----------------------------------------------------------------------------- grids per pair


@dataclass
class Grid:
    """Mean of a metric per (temperature, alpha) cell for one pair."""

    pair: str
    temperatures: list[float]
    alphas: list[float]
    means: list[list[float | None]]  # [temperature index][alpha index]
    counts: list[list[int]]
    values: dict[tuple[float, float], list[float]] = field(default_factory=dict)

    def mean(self, temperature: float, alpha: float) -> float | None:
        """Mean metric of the cell, None when no job falls in it."""
        vals = self.values.get((temperature, alpha))
        return sum(vals) / len(vals) if vals else None


def pair_name(job: JobRecord) -> str:
    """The job's pair label, 'all' when it has none."""
    return job.pair_label or "all"


def cell_grids(ranked: list[JobRecord], metric: str | None) -> dict[str, Grid]:
    """Per pair, the mean metric over each temperature x alpha cell (only jobs that have all three)."""
    cells: dict[str, dict[tuple[float, float], list[float]]] = {}
    for job in ranked:
        value = metric_value(job, metric)
        temp, alpha = job.number("temperature"), job.number("alpha")
        if value is None or is_nan(temp) or is_nan(alpha):
            continue
        cells.setdefault(pair_name(job), {}).setdefault((temp, alpha), []).append(value)
    grids = {}
    for pair in sorted(cells, key=natural_key):
        values = cells[pair]
        temps = sorted({t for t, _ in values})
        alphas = sorted({a for _, a in values})
        means = [[None] * len(alphas) for _ in temps]
        counts = [[0] * len(alphas) for _ in temps]
        for (t, a), vals in values.items():
            i, k = temps.index(t), alphas.index(a)
            means[i][k] = sum(vals) / len(vals)
            counts[i][k] = len(vals)
        grids[pair] = Grid(pair, temps, alphas, means, counts, values)
    return grids


def best_per_pair(ranked: list[JobRecord], metric: str | None) -> list[tuple[str, float, JobRecord]]:
    """(pair, best value, job) for each pair, in ranking order (so the best pair comes first)."""
    out: dict[str, tuple[str, float, JobRecord]] = {}
    for job in ranked:  # already sorted best first
        value = metric_value(job, metric)
        if value is not None:
            out.setdefault(pair_name(job), (pair_name(job), value, job))
    return list(out.values())


# ----------------------------------------------------------------------------- rows


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


def _raw(value: Any) -> Any:
    """A value for the CSV: full precision numbers, '' for None."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _keys(jobs: list[JobRecord], attr: str) -> list[str]:
    """Union of the keys of a dict attribute over jobs, in first-seen order."""
    seen: dict[str, None] = {}
    for job in jobs:
        for key in getattr(job, attr):
            seen.setdefault(str(key), None)
    return list(seen)


def other_metrics(jobs: list[JobRecord], metric: str | None) -> list[str]:
    """Every metric name except the ranking one, test/ first, then val/, then the rest, sorted."""
    order = {"test": 0, "val": 1}
    names = [m for m in available_metrics(jobs) if m != metric]
    return sorted(names, key=lambda m: (order.get(m.split("/", 1)[0], 2), m))


def csv_columns(jobs: list[JobRecord], metric: str | None) -> list[str]:
    """CSV header: identity, hparams, the metric, other metrics, params.*, time.*, error."""
    cols = [*CSV_HEAD, "overrides", "task", "experiment", "pair", "teacher", "student",
            "temperature", "alpha", "seed"]
    if metric is not None:
        cols.append(metric)
    cols += other_metrics(jobs, metric)
    cols += [f"params.{k}" for k in _keys(jobs, "params")]
    cols += [f"time.{k}" for k in _keys(jobs, "time")]
    cols.append("error")
    return cols


def csv_row(job: JobRecord, rank: int | None, metric: str | None, columns: list[str]) -> list[Any]:
    """One CSV row for `job` in the order of `columns`."""
    base = {
        "rank": rank, "job": job.rel, "status": job.status, "overrides": job.overrides_str,
        "task": job.task, "experiment": job.experiment, "error": job.reason,
        **{k: job.hparam(k) for k in ("pair", "teacher", "student", "temperature", "alpha", "seed")},
    }
    row = []
    for col in columns:
        if col in base:
            row.append(_raw(base[col]))
        elif col.startswith("params.") and col[7:] in job.params:
            row.append(_raw(job.params[col[7:]]))
        elif col.startswith("time.") and col[5:] in job.time:
            row.append(_raw(job.time[col[5:]]))
        else:
            row.append(_raw(job.metrics.get(col)))
    return row


def write_csv(path: Path, ranked: list[JobRecord], failed: list[JobRecord], metric: str | None) -> None:
    """report.csv: one row per job, ranked jobs first (rank 1 = best), then failed ones."""
    columns = csv_columns(ranked + failed, metric)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for i, job in enumerate(ranked, 1):
            writer.writerow(csv_row(job, i, metric, columns))
        for job in failed:
            writer.writerow(csv_row(job, None, metric, columns))


def is_kdx_csv(path: Path) -> bool:
    """True when `path` starts with the header kdx-report writes."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            head = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return tuple(head[: len(CSV_HEAD)]) == CSV_HEAD


def is_kdx_markdown(path: Path) -> bool:
    """True when `path` starts with the kdx report marker line."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip() == MARKER
    except (OSError, UnicodeDecodeError):
        return False


# ----------------------------------------------------------------------------- markdown


def _md_cell(value: Any) -> str:
    """Escape a value for a Markdown table cell."""
    text = value if isinstance(value, str) else fmt(value)
    text = " ".join(text.split())
    if len(text) > 300:
        text = text[:297] + "..."
    return text.replace("|", "\\|")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _time_s(job: JobRecord) -> float | None:
    """Total seconds of the job, else fit+test seconds."""
    total = to_float(job.time.get("total_s"))
    if total is None:
        parts = [to_float(job.time.get(k)) for k in ("fit_s", "test_s")]
        total = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
    return total


def _params(job: JobRecord) -> Any:
    """Parameter count of the trained network."""
    return job.params.get("network", next(iter(job.params.values()), None)) if job.params else None


def ranking_rows(
    ranked: list[JobRecord], metric: str | None, others: list[str]
) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the ranking table (shared by Markdown and rich)."""
    headers = ["#", "job", "status", "overrides", "pair", "teacher", "student", "T", "alpha"]
    headers += ([metric] if metric else []) + others + ["params", "time_s"]
    rows = []
    for i, job in enumerate(ranked, 1):
        row = [i, job.rel, job.status, job.overrides_str, job.hparam("pair"), job.hparam("teacher"),
               job.hparam("student"), job.number("temperature"), job.number("alpha")]
        row += [job.metrics.get(m) for m in ([metric] if metric else []) + others]
        row += [_params(job), _time_s(job)]
        rows.append(row)
    return headers, rows


def failed_rows(failed: list[JobRecord]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the failed-jobs table."""
    return (["job", "status", "reason", "overrides"],
            [[j.rel, j.status, j.reason, j.overrides_str] for j in failed])


def describe(job: JobRecord) -> str:
    """Short description of a job's configuration: pair, T, alpha and overrides."""
    bits = []
    for key, label in (("pair", "pair"), ("temperature", "T"), ("alpha", "alpha")):
        val = job.hparam(key)
        if val not in (None, ""):
            num = to_float(val)
            bits.append(f"{label}={fmt(num) if num is not None and key != 'pair' else val}")
    if job.overrides:
        bits.append(f"[{job.overrides_str}]")
    return " ".join(bits)


def summary_line(ranked: list[JobRecord], failed: list[JobRecord], metric: str | None, mode: str) -> str:
    """One line: the best configuration and the job counts."""
    counts = f"{len(ranked)} completed, {len(failed)} failed"
    best = best_job(ranked, metric)
    if best is None:
        why = "no completed job has metrics" if metric is None else f"no completed job has {metric}"
        return f"No best configuration: {why} ({counts})."
    desc = describe(best)
    return (f"Best {metric}={fmt(best.metrics[metric])} ({mode}) in {best.rel}"
            f"{': ' + desc if desc else ''} ({counts}).")


def render_markdown(
    root: Path, ranked: list[JobRecord], failed: list[JobRecord], metric: str | None, mode: str,
    grids: dict[str, Grid], pairs: list[tuple[str, float, JobRecord]], images: dict[str, str],
) -> str:
    """The whole report.md text, starting with the marker line."""
    others = other_metrics(ranked, metric)
    out = [MARKER, f"# kdx sweep report: `{root}`", "",
           f"Ranked by **{metric or '-'}** ({mode}); {len(ranked)} completed, {len(failed)} failed.", "",
           f"**{summary_line(ranked, failed, metric, mode)}**", "", "## Ranking", ""]
    if ranked:
        out += [markdown_table(*ranking_rows(ranked, metric, others)), ""]
    else:
        out += ["No job completed.", ""]
    if pairs:
        out += ["## Best per pair", ""]
        if "pairs" in images:
            out += [f"![best {metric} per pair]({images['pairs']})", ""]
        out += [markdown_table(["pair", metric or "", "job", "configuration"],
                               [[p, v, j.rel, describe(j)] for p, v, j in pairs]), ""]
    if grids:
        out += [f"## {metric} over temperature x alpha", "",
                "Mean over the jobs that share a cell (n = number of jobs, e.g. seeds).", ""]
        for pair, grid in grids.items():
            out += [f"### {pair}", ""]
            if pair in images:
                out += [f"![{metric} heatmap for {pair}]({images[pair]})", ""]
            headers = ["T \\ alpha"] + [fmt(a) for a in grid.alphas]
            rows = []
            for i, t in enumerate(grid.temperatures):
                cells = []
                for k in range(len(grid.alphas)):
                    mean, n = grid.means[i][k], grid.counts[i][k]
                    cells.append("" if mean is None else fmt(mean) + (f" (n={n})" if n > 1 else ""))
                rows.append([fmt(t), *cells])
            out += [markdown_table(headers, rows), ""]
    out += [f"## Failed jobs ({len(failed)})", ""]
    out += [markdown_table(*failed_rows(failed)), ""] if failed else ["None.", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- rich


def print_rich(ranked: list[JobRecord], failed: list[JobRecord], metric: str | None, console: Any = None) -> None:
    """Print the ranking and failed jobs with rich (a few metrics only, to fit a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    others = [m for m in other_metrics(ranked, metric) if m.startswith("test/")][:3]
    headers, rows = ranking_rows(ranked, metric, others)
    drop = {"status", "teacher", "student"}  # status is always completed here; pair names both nets
    table = Table(title=f"kdx sweep ranked by {metric or '-'}", show_lines=False)
    keep = [i for i, h in enumerate(headers) if h not in drop]
    for i in keep:
        table.add_column("other overrides" if headers[i] == "overrides" else headers[i], overflow="fold",
                         style="bold green" if headers[i] == metric else None,
                         justify="right" if i == 0 or i >= 7 else "left")
    shown = set(HPARAM_KEYS)  # overrides already shown as columns are left out of the terminal table
    for n, (job, row) in enumerate(zip(ranked, rows)):
        row[headers.index("overrides")] = " ".join(
            o for o in job.overrides if o.partition("=")[0].lstrip("+~").split(".")[-1] not in shown)
        table.add_row(*(_md_cell(row[i]) for i in keep), style="bold" if n == 0 else None)
    console.print(table)
    if failed:
        ftable = Table(title=f"failed jobs ({len(failed)})", title_style="bold red")
        for h in ("job", "status", "reason"):
            ftable.add_column(h, overflow="fold")
        for job in failed:
            ftable.add_row(job.rel, job.status, job.reason or "")
        console.print(ftable)
