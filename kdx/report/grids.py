"""The temperature x alpha grids of a sweep, one per teacher/student pair, with the student-alone baseline each
distilled grid is compared with, and the best job of each pair."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdx.report.cells import fmt, short_value
from kdx.report.collect import JobRecord, is_nan, natural_key
from kdx.report.rank import metric_value
from kdx.report.seeds import sample_std


@dataclass
class Baseline:
    """The student trained alone (labels only) that a distilled grid is compared with: mean over its runs."""

    value: float
    jobs: list[str]

    @property
    def label(self) -> str:
        runs = f"{len(self.jobs)} runs" if len(self.jobs) > 1 else short_value(self.jobs[0], 0)
        return f"student alone {fmt(self.value)} ({runs})"


@dataclass
class Grid:
    """Mean (and std, see `std`) of a metric per (temperature, alpha) cell for one pair."""

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

    def std(self, temperature: float, alpha: float) -> float | None:
        """Sample std (ddof=1) of the cell's jobs (its seeds), None below two jobs."""
        return sample_std(self.values.get((temperature, alpha), []))


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
