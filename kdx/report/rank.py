"""Which metric a report ranks by, in which direction, and the jobs ranked by it (failed jobs apart).

By default the ranking metric is the validation metric that picked each job's checkpoint: ranking by a test
metric would choose hyper-parameters on the test set (test metrics are shown next to it instead).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable

from kdx.errors import KdxError
from kdx.report.collect import JobRecord, is_nan, natural_key

TEST_PREFIX = "test/"  # metrics of the test set: reported next to the ranking metric, never ranked by default
MODES = ("max", "min")
_MIN_TOKENS = {"loss", "err", "error", "eer", "fnmr", "fmr", "fpr", "fnr", "mse", "mae", "nll", "ppl"}


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
