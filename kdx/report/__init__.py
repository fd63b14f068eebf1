"""Sweep reports: collect every results.json under a folder, rank the jobs, write tables and plots."""

from kdx.report.collect import JobRecord, collect_jobs
from kdx.report.tables import MARKER

__all__ = ["JobRecord", "MARKER", "Report", "collect_jobs", "make_report", "report_main"]


def __getattr__(name: str):
    """Import the CLI lazily, so `python -m kdx.report.cli` runs without a double import."""
    if name in ("Report", "make_report", "report_main"):
        from kdx.report import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'kdx.report' has no attribute {name!r}")
