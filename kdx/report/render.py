"""The report's files: report.csv (every job, full precision), report.md (configurations over seeds, ranking, best
per pair, the grids, failed jobs) and report_seeds.csv (one row per configuration, when one has several seeds),
each recognisable as kdx-report's own (so a rerun replaces only its own files), and the one-line summary; the
table rows are shared with the terminal table (kdx.report.terminal)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from kdx.io import atomic_write_text
from kdx.report.cells import cell_text, fmt, short_value
from kdx.report.collect import JobRecord, to_float
from kdx.report.grids import Grid
from kdx.report.rank import available_metrics, best_job, is_test_metric, test_counterpart, test_metric_note
from kdx.report.seeds import ONE_SEED_NOTE, ConfigStats, has_seeds, pm, seeds_rows, verdict
from kdx.text import csv_cell, markdown_table as _markdown_table, markdown_text

MARKER = "<!-- kdx-report -->"
CSV_HEAD = ("rank", "job", "status")  # every kdx report.csv header starts with these
SEEDS_CSV_HEAD = ("rank", "configuration", "n", "seeds")  # every kdx report_seeds.csv header starts with these


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



# ----------------------------------------------------------------------------- csv


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


def write_seeds_csv(path: Path, configs: list[ConfigStats], metric: str | None) -> None:
    """report_seeds.csv: one row per configuration, best mean first, with n, seeds, mean, sample std and the 95%
    interval of `metric` (full precision) and the matching test metric's mean and std."""
    test = next((c.test_metric for c in configs if c.test_metric), None)
    columns = [*SEEDS_CSV_HEAD, f"{metric} mean", f"{metric} std", f"{metric} ci95_lo", f"{metric} ci95_hi"]
    columns += [f"{test} mean", f"{test} std"] if test else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow([csv_cell(c) for c in [*columns, "jobs"]])
    for i, c in enumerate(configs, 1):
        row = [i, c.label, c.n, " ".join(c.seeds), c.mean, c.std, *(c.ci or (None, None))]
        row += [c.test_mean, c.test_std] if test else []
        writer.writerow([csv_cell(_raw(v)) for v in [*row, " ".join(j.rel for j in c.jobs)]])
    atomic_write_text(path, buffer.getvalue())


def is_kdx_csv(path: Path, head: tuple[str, ...] = CSV_HEAD) -> bool:
    """True when `path` starts with the header kdx-report writes (`head`: report.csv's, or SEEDS_CSV_HEAD)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            first = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return tuple(first[: len(head)]) == head


def is_kdx_seeds_csv(path: Path) -> bool:
    """True when `path` starts with the header of a report_seeds.csv kdx-report wrote."""
    return is_kdx_csv(path, SEEDS_CSV_HEAD)


def is_kdx_markdown(path: Path) -> bool:
    """True when `path` starts with the kdx report marker line."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip() == MARKER
    except (OSError, UnicodeDecodeError):
        return False


# ----------------------------------------------------------------------------- markdown


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table of report values (each one line of at most 300 characters, made inert)."""
    return _markdown_table([cell_text(h) for h in headers], [[cell_text(c) for c in row] for row in rows])


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
        bits.append("[" + " ".join(f"{k}={short_value(v)}" if sep else o
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
    configs: list[ConfigStats] | None = None,
) -> str:
    """The whole report.md text, starting with the marker line; `configs` (seeds.group_configs) gives the
    "Over seeds" section when one of them has several seeds, else a one-line note."""
    others = other_metrics(ranked, metric)
    note = test_metric_note(metric)
    out = [MARKER, f"# kdx sweep report: {markdown_text(root)}", "",
           f"Ranked by **{markdown_text(metric or '-')}** ({mode}); {len(ranked)} completed, {len(failed)} failed."
           + ("" if is_test_metric(metric) else " Test metrics are shown next to it, not ranked by."), "",
           *([f"> **Note:** {note}.", ""] if note else []),
           f"**{markdown_text(summary_line(ranked, failed, metric, mode))}**", ""]
    if configs and has_seeds(configs):
        out += ["## Over seeds", "",
                f"Jobs that differ only by their seed form one configuration: mean ± sample std of "
                f"{markdown_text(metric)} over its seeds, and the 95% confidence interval of the mean (Student t).", "",
                markdown_table(*seeds_rows(configs, metric)), "", markdown_text(verdict(configs, metric)), ""]
    elif configs and len(configs) > 1:
        out += [ONE_SEED_NOTE, ""]  # kdx's own text: its code span is meant
    out += ["## Ranking", ""]
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
                "Mean ± sample std over the jobs that share a cell (n = number of jobs, e.g. seeds).", ""]
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
                    text = pm(mean, grid.std(t, grid.alphas[k]))
                    cells.append("" if mean is None else text + (f" (n={n})" if n > 1 else "") + delta)
                rows.append([fmt(t), *cells])
            out += [markdown_table(headers, rows), ""]
    out += [f"## Failed jobs ({len(failed)})", ""]
    out += [markdown_table(*failed_rows(failed)), ""] if failed else ["None.", ""]
    return "\n".join(out)
