"""`make_report(DIR)`: rank the jobs of a run or multirun folder and write report.md, report.csv, report_seeds.csv
(configurations over seeds, when a sweep has several seeds of one) and plots (what
`kdx-report DIR`, kdx.cli.report_main, runs). Every target is checked before anything is written: a file kdx-report
did not write is never overwritten."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdx.errors import KdxError
from kdx.io import atomic_write_text
from kdx.report.collect import JobRecord, collect_jobs
from kdx.report.grids import attach_baselines, best_per_pair, cell_grids, is_student_alone
from kdx.report.rank import best_job, choose_metric, choose_mode, rank_jobs, test_metric_note
from kdx.report.render import (is_kdx_csv, is_kdx_markdown, is_kdx_seeds_csv, render_markdown, summary_line,
                               write_csv, write_seeds_csv)
from kdx.report.seeds import ConfigStats, group_configs, has_seeds

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
REPORT_SEEDS_CSV = "report_seeds.csv"


@dataclass
class Report:
    """What `make_report` found and wrote."""

    root: Path
    out: Path
    metric: str | None
    mode: str
    ranked: list[JobRecord]
    failed: list[JobRecord]
    summary: str
    files: list[Path] = field(default_factory=list)
    note: str | None = None  # a warning about the choice of metric (ranking by a test metric)
    configs: list[ConfigStats] = field(default_factory=list)  # the jobs grouped over seeds, best mean first

    @property
    def best(self) -> JobRecord | None:
        """The best completed job, None when no job has the metric."""
        return best_job(self.ranked, self.metric)


def _check_ours(path: Path, is_ours) -> None:
    """Refuse to overwrite `path` when it exists and kdx-report did not write it."""
    if path.exists() and (not path.is_file() or not is_ours(path)):
        raise KdxError(
            f"{path} exists and is not a kdx report; pass --out with another folder so it is not overwritten."
        )


def make_report(
    root: str | Path, metric: str | None = None, mode: str | None = None,
    out: str | Path | None = None, plots: bool = True, baselines: list[str | Path] | None = None,
) -> Report:
    """Collect the jobs under `root`, rank them and write report.md, report.csv and the PNGs into `out`.

    `baselines`: run folders (or folders of runs) of the student trained alone, compared with in the heatmaps;
    student-alone runs under `root` are found without it."""
    jobs = collect_jobs(root)
    root = Path(root).expanduser().resolve()
    metric = choose_metric(jobs, metric, root)
    mode = choose_mode(jobs, metric, mode)
    ranked, failed = rank_jobs(jobs, metric, mode)
    grids = cell_grids(ranked, metric)
    extra = [job for folder in baselines or [] for job in collect_jobs(folder)]
    if baselines and not any(is_student_alone(j) for j in extra):
        raise KdxError(f"--baseline {' '.join(str(b) for b in baselines)} holds no finished student-alone run "
                       f"(task=supervised, task.network=student); pass the run folder of one.")
    attach_baselines(grids, ranked + extra, metric)
    pairs = best_per_pair(ranked, metric)
    configs = group_configs(ranked, metric, mode)

    out = Path(out).expanduser() if out is not None else root
    if out.exists() and not out.is_dir():
        raise KdxError(f"--out {out} is a file; pass --out with a folder.")
    md_path, csv_path, seeds_path = out / REPORT_MD, out / REPORT_CSV, out / REPORT_SEEDS_CSV

    from kdx.report import plots as plot_mod  # matplotlib is imported only when a report is written

    heat_names = plot_mod.heatmap_names(list(grids)) if plots else {}
    pngs = {pair: out / name for pair, name in heat_names.items()}
    if plots and pairs:
        pngs["pairs"] = out / plot_mod.PAIRS_PNG
    # check every target before writing anything, so a refusal leaves the folder untouched
    _check_ours(md_path, is_kdx_markdown)
    _check_ours(csv_path, is_kdx_csv)
    if has_seeds(configs):
        _check_ours(seeds_path, is_kdx_seeds_csv)
    for path in pngs.values():
        _check_ours(path, plot_mod.is_kdx_png)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdxError(f"cannot create --out folder {out} ({exc.strerror}); pass --out with a writable folder.") from exc

    written: list[Path] = []
    for pair, grid in grids.items():
        if pair in pngs:
            written.append(plot_mod.heatmap_png(grid, metric, mode, pngs[pair]))
    if "pairs" in pngs:
        written.append(plot_mod.pairs_png(pairs, metric, mode, pngs["pairs"], configs))
    write_csv(csv_path, ranked, failed, metric)
    if has_seeds(configs):
        write_seeds_csv(seeds_path, configs, metric)
    elif seeds_path.is_file() and is_kdx_seeds_csv(seeds_path):
        seeds_path.unlink()  # an earlier report's configurations: stale beside this one, which has one seed each
    images = {key: path.name for key, path in pngs.items()}
    atomic_write_text(md_path, render_markdown(root, ranked, failed, metric, mode, grids, pairs, images, configs)
                       + "\n")
    summary = summary_line(ranked, failed, metric, mode)
    files = [md_path, csv_path, *([seeds_path] if has_seeds(configs) else []), *written]
    return Report(root, out, metric, mode, ranked, failed, summary, files,
                  note=test_metric_note(metric), configs=configs)
