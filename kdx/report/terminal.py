"""The ranking printed in the terminal with rich: one line per job at any width (report.md and report.csv have
every column), and the configurations over seeds with the sentence that says whether the best one wins by more
than the seed-to-seed noise."""

from __future__ import annotations

from typing import Any

from kdx.report.cells import cell_text, short_value
from kdx.report.collect import HPARAM_KEYS, JobRecord
from kdx.report.rank import TEST_PREFIX, test_counterpart
from kdx.report.render import other_metrics, ranking_rows
from kdx.report.seeds import ConfigStats, config_overrides, has_seeds, seeds_rows, verdict
from kdx.text import markdown_text, rich_text


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
    cells: dict[str, list[str]] = {h: [markdown_text(cell_text(r[i])) for r in rows] for i, h in enumerate(headers)}
    cells["overrides"] = [" ".join(f"{k}={short_value(v)}" for k, _, v in (o.partition("=") for o in items))
                          for items in varying]
    names = {"overrides": "other overrides", "T": "T", "alpha": "alpha"}
    order = ["#", "job", "pair", "T", "alpha", *([metric] if metric else []), *tests, "overrides", "params", "time_s"]
    order = [h for h in order if h in cells and (h in ("#", "job") or h == metric or any(cells[h]))]
    priority = ["#", *([metric] if metric else []), "job", *tests[:1], "pair", "T", "alpha", *tests[1:], "overrides",
                "params", "time_s"]
    widths = {h: max([len(names.get(h, h))] + [len(c) for c in cells[h]]) for h in order}
    chosen = set(_fit_columns(widths, [h for h in priority if h in widths], console.width, "overrides", 16))
    if common:
        console.print(rich_text("same in every job: " + " ".join(f"{k}={short_value(v)}" for k, _, v in
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


def print_seeds(configs: list[ConfigStats], metric: str | None, console: Any = None) -> None:
    """Print the configurations over seeds (pair, T, alpha, other overrides, n, seeds, mean ± std, 95% CI, test
    mean ± std), best mean first, one line each with the least important columns left out when the terminal is
    narrow, then the sentence saying whether the best wins by more than the noise; nothing when every
    configuration has one seed."""
    if not has_seeds(configs):
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    headers, rows = seeds_rows(configs, metric)
    first = [c.jobs[0] for c in configs]
    varying, _ = split_overrides(first)
    stages = [c.label.removeprefix(" ".join(config_overrides(j)) or "(no overrides)").strip()  # "(kd)"
              for c, j in zip(configs, first)]
    cells = {h: [cell_text(r[i]) for r in rows] for i, h in enumerate(headers) if h != "configuration"}
    cells["pair"] = [j.pair_label for j in first]
    cells["T"], cells["alpha"] = ([cell_text(j.number(k)) for j in first] for k in ("temperature", "alpha"))
    cells["other"] = [" ".join([*(f"{k}={short_value(v)}" for k, _, v in (o.partition("=") for o in items
                                 if o.partition("=")[0].lstrip("+~") != "seed")), *([st] if st else [])])
                      for items, st in zip(varying, stages)]
    mean_col, ci_col, test_col = headers[4], headers[5], (headers[6] if len(headers) > 6 else None)
    names = {mean_col: "mean ± std", test_col: headers[6].replace(" mean ± std", "") if test_col else None}
    order = [h for h in ("#", "pair", "T", "alpha", "other", "n", "seeds", mean_col, ci_col, test_col)
             if h in cells and (h in ("#", mean_col) or any(cells[h]))]
    priority = [h for h in ("#", mean_col, ci_col, "n", "pair", "T", "alpha", test_col, "seeds", "other")
                if h in order]
    widths = {h: max([len(names.get(h, h))] + [len(c) for c in cells[h]]) for h in order}
    chosen = set(_fit_columns(widths, priority, console.width, "other", 16))
    table = Table(title=rich_text(f"configurations over seeds: {metric or '-'}, mean ± std, best mean first"),
                  box=box.SIMPLE_HEAD, show_edge=False)
    shown = [h for h in order if h in chosen]
    for h in shown:
        table.add_column(names.get(h, h), no_wrap=True, overflow="ellipsis",
                         style="bold green" if h == mean_col else None,
                         justify="left" if h in ("pair", "other", "seeds") else "right",
                         min_width=16 if h == "other" else None)
    for n in range(len(configs)):
        table.add_row(*(rich_text(cells[h][n]) for h in shown), style="bold" if n == 0 else None)
    console.print(table)
    left_out = [names.get(h, h) for h in order if h not in chosen]
    if left_out:
        console.print(f"(left out to fit {console.width} columns: {', '.join(left_out)}; report.md and "
                      f"report_seeds.csv have every column)", soft_wrap=True)
    console.print(rich_text(verdict(configs, metric)), soft_wrap=True)
