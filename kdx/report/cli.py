"""`kdx-report DIR`: rank the jobs of a run or multirun folder and write report.md, report.csv and plots."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kdx.errors import KdxError
from kdx.io import atomic_write_text
from kdx.report import tables
from kdx.text import terminal_text
from kdx.report.collect import JobRecord, collect_jobs

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"


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

    @property
    def best(self) -> JobRecord | None:
        """The best completed job, None when no job has the metric."""
        return tables.best_job(self.ranked, self.metric)


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
    metric = tables.choose_metric(jobs, metric, root)
    mode = tables.choose_mode(jobs, metric, mode)
    ranked, failed = tables.rank_jobs(jobs, metric, mode)
    grids = tables.cell_grids(ranked, metric)
    extra = [job for folder in baselines or [] for job in collect_jobs(folder)]
    if baselines and not any(tables.is_student_alone(j) for j in extra):
        raise KdxError(f"--baseline {' '.join(str(b) for b in baselines)} holds no finished student-alone run "
                       f"(task=supervised, task.network=student); pass the run folder of one.")
    tables.attach_baselines(grids, ranked + extra, metric)
    pairs = tables.best_per_pair(ranked, metric)

    out = Path(out).expanduser() if out is not None else root
    if out.exists() and not out.is_dir():
        raise KdxError(f"--out {out} is a file; pass --out with a folder.")
    md_path, csv_path = out / REPORT_MD, out / REPORT_CSV

    from kdx.report import plots as plot_mod  # matplotlib is imported only when a report is written

    heat_names = plot_mod.heatmap_names(list(grids)) if plots else {}
    pngs = {pair: out / name for pair, name in heat_names.items()}
    if plots and pairs:
        pngs["pairs"] = out / plot_mod.PAIRS_PNG
    # check every target before writing anything, so a refusal leaves the folder untouched
    _check_ours(md_path, tables.is_kdx_markdown)
    _check_ours(csv_path, tables.is_kdx_csv)
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
        written.append(plot_mod.pairs_png(pairs, metric, mode, pngs["pairs"]))
    tables.write_csv(csv_path, ranked, failed, metric)
    images = {key: path.name for key, path in pngs.items()}
    atomic_write_text(md_path, tables.render_markdown(root, ranked, failed, metric, mode, grids, pairs, images) + "\n")
    summary = tables.summary_line(ranked, failed, metric, mode)
    return Report(root, out, metric, mode, ranked, failed, summary, [md_path, csv_path, *written],
                  note=tables.test_metric_note(metric))


def build_parser() -> argparse.ArgumentParser:
    """The kdx-report argument parser."""
    parser = argparse.ArgumentParser(
        prog="kdx-report",
        description="Rank the jobs of a kdx run or Hydra multirun folder by a metric; "
                    "write report.md, report.csv, heatmap_<pair>.png and pairs.png.",
    )
    parser.add_argument("dir", metavar="DIR", help="run or multirun folder holding results.json files")
    parser.add_argument("--metric", default=None,
                        help="metric to rank by (default: the validation metric that picked each job's "
                             "checkpoint, best_<checkpoint.monitor>, e.g. best_val/acc1; test metrics are shown "
                             "next to it: ranking by one would fit the hyper-parameters to the test set)")
    parser.add_argument("--mode", choices=tables.MODES, default=None,
                        help="max: higher is better, min: lower is better "
                             "(default: the jobs' monitor.mode, else min for loss/error metrics)")
    parser.add_argument("--out", default=None, metavar="OUT",
                        help="folder for report.md, report.csv and the PNGs (default: DIR)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--baseline", nargs="+", default=None, metavar="RUN",
                        help="run folder(s) of the student trained alone (e.g. outputs/fmnist_student/<time>), "
                             "shown in each heatmap of that student; student-alone runs under DIR are found anyway")
    return parser


def report_main(argv: list[str] | None = None) -> int:
    """Entry point of `kdx-report`; returns 0, or 2 after printing a one-sentence error on stderr."""
    args = build_parser().parse_args(argv)
    try:
        report = make_report(args.dir, args.metric, args.mode, args.out, plots=not args.no_plots,
                             baselines=args.baseline)
    except KdxError as exc:
        print(f"kdx-report: error: {exc}", file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console()
    tables.print_rich(report.ranked, report.failed, report.metric, console)
    print(terminal_text(report.summary))  # job folders and overrides may hold control sequences
    if report.note:
        print(f"kdx-report: note: {report.note}.", file=sys.stderr)
    print(f"Wrote {', '.join(p.name for p in report.files)} to {report.out}")
    return 0


if __name__ == "__main__":
    sys.exit(report_main())
