"""Configurations over seeds: the completed jobs of a sweep grouped by everything but their seed, with the mean,
sample standard deviation and 95% confidence interval of the ranking metric per configuration, so a report shows
whether the best configuration wins by more than the seed-to-seed noise (`kdx-train -m ... seed=0,1,2`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from kdx.report.cells import fmt
from kdx.report.collect import JobRecord, natural_key
from kdx.report.rank import available_metrics, metric_value, test_counterpart

# overrides that say how or where a job runs, not what it trains (kdx.runs.RESUME_KEYS, the output folder's name)
_NOT_CONFIG = {"seed", "run_name", "resume", "force"}

# Student t quantile t_{0.975} for 1..30 degrees of freedom, then 40, 60, 120 (3 decimals, checked against
# scipy.stats.t.ppf in tests/test_report_seeds.py); between tabulated values the next lower df is used (a wider,
# safe interval), and 1.96 (the normal quantile) beyond 120. scipy is not a kdx dependency.
T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
    21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
    40: 2.021, 60: 2.000, 120: 1.980,
}


def t975(df: int) -> float:
    """The two-sided 95% Student t quantile for `df` >= 1 degrees of freedom (table T975)."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    return 1.96 if df > 120 else T975[max(k for k in T975 if k <= df)]


def mean(values: list[float]) -> float | None:
    """The arithmetic mean, None for no values."""
    return sum(values) / len(values) if values else None


def sample_std(values: list[float]) -> float | None:
    """The sample standard deviation (ddof=1), None for fewer than two values."""
    if len(values) < 2:
        return None
    centre = sum(values) / len(values)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))


def interval95(values: list[float]) -> tuple[float, float] | None:
    """95% confidence interval of the mean, mean ± t975(n-1) * std / sqrt(n); None for fewer than two values."""
    std = sample_std(values)
    if std is None:
        return None
    half = t975(len(values) - 1) * std / math.sqrt(len(values))
    centre = sum(values) / len(values)
    return centre - half, centre + half


def pm(centre: float | None, std: float | None) -> str:
    """'mean ± std', or the mean alone without a std, '' without a mean."""
    if centre is None:
        return ""
    return fmt(centre) + (f" ± {fmt(std)}" if std is not None else "")


@dataclass(frozen=True)
class ConfigStats:
    """One configuration (a sweep's jobs that differ only by seed) and its metric over those seeds."""

    label: str  # its overrides without seed, e.g. "distill.temperature=4 distill.alpha=0.9 pair=..."
    jobs: tuple[JobRecord, ...]  # ordered by seed
    seeds: tuple[str, ...]
    values: tuple[float, ...]  # the ranking metric, one per job
    test_metric: str | None = None
    test_values: tuple[float, ...] = ()  # the matching test metric of the jobs that have it

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return mean(list(self.values))

    @property
    def std(self) -> float | None:
        return sample_std(list(self.values))

    @property
    def ci(self) -> tuple[float, float] | None:
        return interval95(list(self.values))

    @property
    def test_mean(self) -> float | None:
        return mean(list(self.test_values))

    @property
    def test_std(self) -> float | None:
        return sample_std(list(self.test_values))

    @property
    def ci_text(self) -> str:
        """'[lo, hi]', '' without an interval."""
        return f"[{fmt(self.ci[0])}, {fmt(self.ci[1])}]" if self.ci else ""


def config_overrides(job: JobRecord) -> list[str]:
    """The job's overrides that say what it trains: not its seed, hydra.* or where/how it runs."""
    keep = []
    for item in job.overrides:
        name = item.partition("=")[0].lstrip("+~")
        if name not in _NOT_CONFIG and name.split(".")[0] != "hydra":
            keep.append(item)
    return keep


def config_key(job: JobRecord) -> tuple[Any, ...]:
    """What jobs of one configuration share: task, experiment, overrides and hparams (pipeline stages share their
    overrides but not their hparams), each without the seed."""
    hparams = {k: v for k, v in job.hparams.items() if k != "seed"}
    return (job.task, job.experiment, tuple(config_overrides(job)), json.dumps(hparams, sort_keys=True, default=str))


def _labels(groups: list[list[JobRecord]]) -> list[str]:
    """Each group's overrides without seed; groups alike in their overrides (the stages of a pipeline run) also
    get their stage folder, else their task and network."""
    base = [" ".join(config_overrides(g[0])) or "(no overrides)" for g in groups]
    labels = []
    for label, group in zip(base, groups):
        if base.count(label) > 1:
            stages = {j.rel.rsplit("/", 1)[-1] for j in group}
            stage = stages.pop() if len(stages) == 1 else ""
            extra = stage if stage and not stage.isdigit() else " ".join(
                str(x) for x in (group[0].task, group[0].hparams.get("network")) if x)
            label = f"{label} ({extra or group[0].rel})"
        labels.append(label)
    return labels


def group_configs(ranked: list[JobRecord], metric: str | None, mode: str = "max") -> list[ConfigStats]:
    """The completed jobs that have `metric`, grouped into configurations (same everything but seed), best
    mean first (`mode` max: highest first; min: lowest first)."""
    groups: dict[tuple[Any, ...], list[JobRecord]] = {}
    for job in ranked:
        if job.ok and metric_value(job, metric) is not None:
            groups.setdefault(config_key(job), []).append(job)
    seed_of = lambda j: str(j.hparam("seed") if j.hparam("seed") not in (None, "") else "?")  # noqa: E731
    members = [sorted(g, key=lambda j: (natural_key(seed_of(j)), natural_key(j.rel))) for g in groups.values()]
    test = test_counterpart(metric, available_metrics(ranked))
    configs = [
        ConfigStats(label, tuple(g), tuple(seed_of(j) for j in g), tuple(metric_value(j, metric) for j in g), test,
                    tuple(v for v in (metric_value(j, test) for j in g) if v is not None) if test else ())
        for label, g in zip(_labels(members), members)
    ]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(configs, key=lambda c: (sign * c.mean, natural_key(c.jobs[0].rel)))


def has_seeds(configs: list[ConfigStats]) -> bool:
    """True when some configuration ran with two seeds or more (so intervals can be given)."""
    return any(c.n >= 2 for c in configs)


ONE_SEED_NOTE = ("One seed per configuration, so no interval can be given; run several with "
                 "`kdx-train -m ... seed=0,1,2`.")


def _describe(c: ConfigStats) -> str:
    """'LABEL (mean ± std over n seeds, 95% CI [lo, hi])'."""
    spread = f"{pm(c.mean, c.std)} over {c.n} seeds, 95% CI {c.ci_text}" if c.ci else f"{fmt(c.mean)}, one seed"
    return f"{c.label} ({spread})"


def verdict(configs: list[ConfigStats], metric: str | None) -> str:
    """One sentence: the best configuration by the mean and whether its 95% interval overlaps the runner-up's
    (an overlap means the win may be seed-to-seed noise)."""
    if not configs:
        return f"No configuration has {metric}."
    best = configs[0]
    head = f"Best by the mean {metric}: {_describe(best)}"
    if len(configs) == 1:
        return f"{head}; it is the only configuration."
    second = configs[1]
    if best.ci is None or second.ci is None:
        alone = ("either" if best.ci is None and second.ci is None
                 else "the best" if best.ci is None else "the runner-up")
        return f"{head}; the runner-up is {_describe(second)}, and with one seed {alone} has no interval to compare."
    overlap = best.ci[0] <= second.ci[1] and second.ci[0] <= best.ci[1]
    return (f"{head}; its interval {'overlaps' if overlap else 'does not overlap'} that of the runner-up "
            f"{_describe(second)}, so the win "
            + ("may be within the seed-to-seed noise." if overlap else "is larger than the seed-to-seed noise."))


def seeds_rows(configs: list[ConfigStats], metric: str | None) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the over-seeds table (shared by Markdown and rich)."""
    test = next((c.test_metric for c in configs if c.test_metric), None)
    headers = ["#", "configuration", "n", "seeds", f"{metric} mean ± std", "95% CI"]
    headers += [f"{test} mean ± std"] if test else []
    rows = []
    for i, c in enumerate(configs, 1):
        row = [i, c.label, c.n, ", ".join(c.seeds), pm(c.mean, c.std), c.ci_text]
        rows.append(row + ([pm(c.test_mean, c.test_std)] if test else []))
    return headers, rows
