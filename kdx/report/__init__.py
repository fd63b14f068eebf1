"""Sweep reports: collect every results.json under a folder, rank the jobs, write tables and plots.

- `kdx.report.collect`: the jobs under a folder (JobRecord);
- `kdx.report.rank`: the ranking metric, its direction and the ranked jobs;
- `kdx.report.grids`: temperature x alpha grids per pair, student-alone baselines, the best job per pair;
- `kdx.report.seeds`: jobs grouped into configurations over seeds, with mean, std and 95% interval;
- `kdx.report.cells`, `kdx.report.render`, `kdx.report.terminal`: cell text; report.csv, report.md and the
  summary line; the rich table in the terminal;
- `kdx.report.plots`: the PNGs (matplotlib, imported when a report is written);
- `kdx.report.make`: `make_report`, all of the above for one folder (`kdx-report`, kdx.cli.report_main).
"""

from kdx.report.collect import JobRecord, collect_jobs
from kdx.report.make import Report, make_report
from kdx.report.render import MARKER

__all__ = ["JobRecord", "MARKER", "Report", "collect_jobs", "make_report"]
