"""Rank jobs by a metric and render them as CSV, Markdown and rich tables."""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kdx.errors import KdxError
from kdx.io import atomic_write_text
from kdx.text import csv_cell, markdown_table as _markdown_table, markdown_text, rich_text
from kdx.report.collect import HPARAM_KEYS, JobRecord, is_nan, natural_key, to_float

MARKER = "<!-- kdx-report -->"
CSV_HEAD = ("rank", "job", "status")  # every kdx report.csv header starts with these
TEST_PREFIX = "test/"  # metrics of the test set: reported next to the ranking metric, never ranked by default
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
    """The ranking metric: `metric` if given (must exist); else the validation metric that picked each job's
    checkpoint (`best_<checkpoint.monitor>`, else the monitor itself), else the first val/ metric, else the
    first metric that is not a test metric. Ranking by a test metric would pick hyper-parameters on the test set."""
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

    def most(name: str) -> bool:
        return sum(name in j.metrics for j in done) * 2 > len(done)

    monitors = Counter(j.monitor.get("metric") for j in done if isinstance(j.monitor.get("metric"), str))
    for monitor, _ in monitors.most_common():
        for name in (f"best_{monitor}", monitor):
            if most(name):
                return name
    found = available_metrics(done)
    for prefix in ("best_val/", "val/"):
        chosen = next((m for m in found if m.startswith(prefix)), None)
        if chosen:
            return chosen
    return next((m for m in found if not m.startswith(TEST_PREFIX)), found[0])


def is_test_metric(metric: str | None) -> bool:
    """True for a metric of the test set (test/...)."""
    return bool(metric) and str(metric).startswith(TEST_PREFIX)


def test_counterpart(metric: str | None, names: list[str]) -> str | None:
    """The test metric that matches a validation metric (best_val/acc1 -> test/acc1), if any job has it."""
    if not metric or is_test_metric(metric):
        return None
    bare = metric.removeprefix("best_").split("/", 1)[-1]
    candidate = TEST_PREFIX + bare
    return candidate if candidate in names else None


def test_metric_note(metric: str | None) -> str | None:
    """A warning when ranking by a test metric (choosing hyper-parameters on the test set)."""
    if not is_test_metric(metric):
        return None
    return (f"ranking by {metric}, a test-set metric: hyper-parameters chosen by it are fitted to the test set, "
            f"so its best value overstates what to expect; rank by the validation metric (the default) and read "
            f"{metric} as the final estimate")


def choose_mode(jobs: list[JobRecord], metric: str | None, mode: str | None = None) -> str:
    """`mode` if given, else the jobs' monitor.mode for this metric, else min for loss/error-like names."""
    if mode is not None:
        if mode not in MODES:
            raise KdxError(f"--mode {mode!r} is not valid; pass --mode max or --mode min.")
        return mode
    if metric is None:
        return "max"
    bare = metric.removeprefix("best_")  # best_val/acc1 is ranked the way its monitor val/acc1 was
    modes = Counter(
        j.monitor.get("mode") for j in jobs
        if j.monitor.get("metric") in (metric, bare) and j.monitor.get("mode") in MODES
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
class Baseline:
    """The student trained alone (labels only) that a distilled grid is compared with: mean over its runs."""

    value: float
    jobs: list[str]

    @property
    def label(self) -> str:
        runs = f"{len(self.jobs)} runs" if len(self.jobs) > 1 else _short_value(self.jobs[0], 0)
        return f"student alone {fmt(self.value)} ({runs})"


@dataclass
class Grid:
    """Mean of a metric per (temperature, alpha) cell for one pair."""

    pair: str
    temperatures: list[float]
    alphas: list[float]
    means: list[list[float | None]]  # [temperature index][alpha index]
    counts: list[list[int]]
    values: dict[tuple[float, float], list[float]] = field(default_factory=dict)
    student: str | None = None  # the distilled architecture, to find its student-alone baseline
    baseline: Baseline | None = None

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
        student = next((j.hparam("student") for j in ranked if pair_name(j) == pair and j.hparam("student")), None)
        grids[pair] = Grid(pair, temps, alphas, means, counts, values, student=student)
    return grids


def is_student_alone(job: JobRecord) -> bool:
    """True for a completed run of the student trained on labels only (task supervised, network student)."""
    return job.ok and job.task == "supervised" and str(job.hparams.get("network", "")) == "student"


def attach_baselines(grids: dict[str, Grid], candidates: list[JobRecord], metric: str | None) -> None:
    """Give each grid the mean `metric` of the student-alone runs of its student architecture (and data)."""
    for grid in grids.values():
        found = [j for j in candidates if is_student_alone(j) and metric_value(j, metric) is not None
                 and grid.student and j.hparam("student") == grid.student]
        if found:
            values = [metric_value(j, metric) for j in found]
            grid.baseline = Baseline(sum(values) / len(values), [str(j.job_dir) for j in found])


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
    return value  # floats are written by the csv module in full precision (repr), unquoted


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
    buffer = io.StringIO()  # cells a spreadsheet would run as formulas are neutralised (csv_cell)
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC)  # every text quoted, so `;` never splits a cell
    writer.writerow([csv_cell(c) for c in columns])
    for i, job in enumerate(ranked, 1):
        writer.writerow([csv_cell(c) for c in csv_row(job, i, metric, columns)])
    for job in failed:
        writer.writerow([csv_cell(c) for c in csv_row(job, None, metric, columns)])
    atomic_write_text(path, buffer.getvalue())


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


def _cell_text(value: Any) -> str:
    """A value as one line of at most 300 characters."""
    text = value if isinstance(value, str) else fmt(value)
    text = " ".join(text.split())
    return text[:297] + "..." if len(text) > 300 else text


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table of report values (each one line of at most 300 characters, made inert)."""
    return _markdown_table([_cell_text(h) for h in headers], [[_cell_text(c) for c in row] for row in rows])


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
        bits.append("[" + " ".join(f"{k}={_short_value(v)}" if sep else o
                                   for o in job.overrides for k, sep, v in [o.partition("=")]) + "]")
    return " ".join(bits)


def summary_line(ranked: list[JobRecord], failed: list[JobRecord], metric: str | None, mode: str) -> str:
    """One line: the best configuration and the job counts."""
    counts = f"{len(ranked)} completed, {len(failed)} failed"
    best = best_job(ranked, metric)
    if best is None:
        why = "no completed job has metrics" if metric is None else f"no completed job has {metric}"
        return f"No best configuration: {why} ({counts})."
    desc = describe(best)
    test = test_counterpart(metric, available_metrics(ranked))
    test_text = f", {test}={fmt(best.metrics[test])}" if test and best.metrics.get(test) is not None else ""
    return (f"Best {metric}={fmt(best.metrics[metric])} ({mode}{test_text}) in {best.rel}"
            f"{': ' + desc if desc else ''} ({counts}).")


def render_markdown(
    root: Path, ranked: list[JobRecord], failed: list[JobRecord], metric: str | None, mode: str,
    grids: dict[str, Grid], pairs: list[tuple[str, float, JobRecord]], images: dict[str, str],
) -> str:
    """The whole report.md text, starting with the marker line."""
    others = other_metrics(ranked, metric)
    note = test_metric_note(metric)
    out = [MARKER, f"# kdx sweep report: {markdown_text(root)}", "",
           f"Ranked by **{markdown_text(metric or '-')}** ({mode}); {len(ranked)} completed, {len(failed)} failed."
           + ("" if is_test_metric(metric) else " Test metrics are shown next to it, not ranked by."), "",
           *([f"> **Note:** {note}.", ""] if note else []),
           f"**{markdown_text(summary_line(ranked, failed, metric, mode))}**", "", "## Ranking", ""]
    if ranked:
        out += [markdown_table(*ranking_rows(ranked, metric, others)), ""]
    else:
        out += ["No job completed.", ""]
    if pairs:
        out += ["## Best per pair", ""]
        if "pairs" in images:
            out += [f"![best {markdown_text(metric)} per pair]({images['pairs']})", ""]
        out += [markdown_table(["pair", metric or "", "job", "configuration"],
                               [[p, v, j.rel, describe(j)] for p, v, j in pairs]), ""]
    if grids:
        out += [f"## {markdown_text(metric)} over temperature x alpha", "",
                "Mean over the jobs that share a cell (n = number of jobs, e.g. seeds).", ""]
        for pair, grid in grids.items():
            out += [f"### {markdown_text(pair)}", ""]
            if grid.baseline is not None:
                out += [f"Baseline: {markdown_text(grid.baseline.label)}; cells show the difference to it in brackets.", ""]
            else:
                out += [f"No student-alone run of {grid.student or 'this student'} was found; pass one with "
                        f"`kdx-report DIR --baseline RUN_DIR` to compare.", ""]
            if pair in images:
                out += [f"![{markdown_text(metric)} heatmap for {markdown_text(pair)}]({images[pair]})", ""]
            headers = ["T \\ alpha"] + [fmt(a) for a in grid.alphas]
            rows = []
            for i, t in enumerate(grid.temperatures):
                cells = []
                for k in range(len(grid.alphas)):
                    mean, n = grid.means[i][k], grid.counts[i][k]
                    delta = f" [{mean - grid.baseline.value:+.4f}]" if grid.baseline and mean is not None else ""
                    cells.append("" if mean is None else fmt(mean) + (f" (n={n})" if n > 1 else "") + delta)
                rows.append([fmt(t), *cells])
            out += [markdown_table(headers, rows), ""]
    out += [f"## Failed jobs ({len(failed)})", ""]
    out += [markdown_table(*failed_rows(failed)), ""] if failed else ["None.", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- rich


def _short_value(value: str, limit: int = 28) -> str:
    """An override value for the terminal: a long path keeps its last two parts (…/checkpoints/best.ckpt)."""
    if len(value) <= limit or "/" not in value:
        return value
    return "…/" + "/".join(value.rstrip("/").split("/")[-2:])


def split_overrides(jobs: list[JobRecord]) -> tuple[list[list[str]], list[str]]:
    """(per job: its overrides that differ between jobs, the overrides every job shares), leaving out those
    whose key is a column of its own (pair, temperature, alpha, ...)."""
    shown = set(HPARAM_KEYS)
    own = [[o for o in job.overrides if o.partition("=")[0].lstrip("+~").split(".")[-1] not in shown] for job in jobs]
    common = [o for o in (own[0] if own else []) if all(o in other for other in own[1:])] if len(own) > 1 else []
    return [[o for o in items if o not in common] for items in own], common


def _fit_columns(widths: dict[str, int], priority: list[str], width: int, flexible: str, flex_min: int) -> list[str]:
    """Columns to show, by priority, whose widths fit `width` (each also takes 2 of padding and 1 of divider, less
    one divider for the row); `flexible` may shrink to flex_min."""
    chosen: list[str] = []
    used = 0
    for name in priority:
        need = (min(widths[name], flex_min) if name == flexible else widths[name]) + 3
        if used + need <= width + 1:
            chosen.append(name)
            used += need
    return chosen


def print_rich(ranked: list[JobRecord], failed: list[JobRecord], metric: str | None, console: Any = None) -> None:
    """Print the ranking and failed jobs with rich, one line per job at any terminal width: overrides shared
    by every job are listed once above, long paths are shortened, and the least important columns are left
    out when the terminal is narrow (report.md and report.csv have them all)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    tests = [m for m in other_metrics(ranked, metric) if m.startswith(TEST_PREFIX)]
    counterpart = test_counterpart(metric, tests)
    tests = ([counterpart] if counterpart else []) + [m for m in tests if m != counterpart]
    tests = tests[:2]
    headers, rows = ranking_rows(ranked, metric, tests)
    varying, common = split_overrides(ranked)
    cells: dict[str, list[str]] = {h: [markdown_text(_cell_text(r[i])) for r in rows] for i, h in enumerate(headers)}
    cells["overrides"] = [" ".join(f"{k}={_short_value(v)}" for k, _, v in (o.partition("=") for o in items))
                          for items in varying]
    names = {"overrides": "other overrides", "T": "T", "alpha": "alpha"}
    order = ["#", "job", "pair", "T", "alpha", *([metric] if metric else []), *tests, "overrides", "params", "time_s"]
    order = [h for h in order if h in cells and (h in ("#", "job") or h == metric or any(cells[h]))]
    priority = ["#", *([metric] if metric else []), "job", *tests[:1], "pair", "T", "alpha", *tests[1:], "overrides",
                "params", "time_s"]
    widths = {h: max([len(names.get(h, h))] + [len(c) for c in cells[h]]) for h in order}
    chosen = set(_fit_columns(widths, [h for h in priority if h in widths], console.width, "overrides", 16))
    if common:
        console.print(rich_text("same in every job: " + " ".join(f"{k}={_short_value(v)}" for k, _, v in
                                                                 (o.partition("=") for o in common))))
    table = Table(title=rich_text(f"kdx sweep ranked by {metric or '-'}"), box=box.SIMPLE_HEAD, show_edge=False)
    shown = [h for h in order if h in chosen]
    for h in shown:
        table.add_column(names.get(h, h), no_wrap=True, overflow="ellipsis",
                         style="bold green" if h == metric else None,
                         justify="right" if h not in ("job", "pair", "overrides") else "left",
                         min_width=16 if h == "overrides" else None)
    for n in range(len(ranked)):
        table.add_row(*(rich_text(cells[h][n]) for h in shown), style="bold" if n == 0 else None)
    console.print(table)
    left_out = [names.get(h, h) for h in order if h not in chosen]
    if left_out:
        console.print(f"(left out to fit {console.width} columns: {', '.join(left_out)}; report.md and report.csv "
                      f"have every column)", soft_wrap=True)
    if failed:
        ftable = Table(title=f"failed jobs ({len(failed)})", title_style="bold red", box=box.SIMPLE_HEAD,
                       show_edge=False)
        for h in ("job", "status", "reason"):
            ftable.add_column(h, overflow="fold")
        for job in failed:
            ftable.add_row(rich_text(job.rel), rich_text(job.status), rich_text(job.reason or ""))
        console.print(ftable)
