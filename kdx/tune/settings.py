"""The `tune` section of kdx-tune (conf/tune.yaml), checked before any work: each bad value is one ConfigError
that names its key and the fix.

A search space maps each method (a distill preset) to config keys and their ranges:
`{distill: {temperature: {low: 1.0, high: 8.0, log: true}}}` searches `distill.temperature` in [1, 8] on a log
scale; `{type: int}` makes a range whole numbers, `{choices: [a, b]}` a categorical setting. Sampled floats are
rounded to 4 significant digits, so the value a trial trains with is the one its report and command show.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kdx.errors import ConfigError

RANGE_KEYS = {"low", "high", "log", "type"}
LEAF_MARKERS = {"low", "high", "choices"}
PRUNERS = ("median", "asha", "none")
SAMPLERS = ("tpe", "random")
DIRECTIONS = ("maximize", "minimize")
# settings that may change between invocations of one study (the rest define the study: see TuneSettings.identity)
RUN_ONLY = ("trials", "jobs", "threads", "timeout", "max_failures")
STUDY_DB = "study.db"
# overrides kdx-tune decides itself, refused on its command line
REFUSED = {"distill": "kdx-tune picks the method of each trial from tune.methods; give tune.methods=[{value}] instead",
           "resume": "kdx-tune continues a study when the same command runs again; drop resume=",
           "force": "kdx-tune never reruns a finished trial; drop force= (a new study: hydra.run.dir=DIR)",
           "sweep": "kdx-tune runs its own search; drop sweep="}


def round_value(value: float) -> float:
    """A sampled float as a trial uses it: 4 significant digits."""
    return float(f"{value:.4g}")


@dataclass(frozen=True)
class Setting:
    """One searched config key of one method: a float or int range, or a list of choices."""

    method: str
    path: str                      # the config key, e.g. distill.temperature
    kind: str                      # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    @property
    def key(self) -> str:
        return f"tune.space.{self.method}.{self.path}"

    @property
    def param_name(self) -> str:
        """The Optuna parameter: one per method, so each method's settings are modelled on their own."""
        return f"{self.method}:{self.path}"

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and float(value) != int(value):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {list(self.choices)}"
        return f"{self.kind} in [{self.low}, {self.high}]" + (" (log scale)" if self.log else "")

    def suggest(self, trial: Any) -> Any:
        """The value of this setting for an Optuna trial (fixed when the trial was enqueued with it)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.param_name, list(self.choices))
        if self.kind == "int":
            return int(trial.suggest_int(self.param_name, int(self.low), int(self.high), log=self.log))
        return round_value(trial.suggest_float(self.param_name, float(self.low), float(self.high), log=self.log))

    def spec(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "type": self.kind}


@dataclass(frozen=True)
class TuneSettings:
    """The checked `tune` section, with the metric and direction resolved from `checkpoint` where not given."""

    methods: tuple[str, ...]
    space: dict[str, tuple[Setting, ...]]
    trials: int
    jobs: int
    threads: int | None
    timeout: float | None
    metric: str
    direction: str
    storage: str | None
    seed: int
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    teacher_cache: str
    baseline: bool
    enqueue: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    max_failures: int = 3

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def identity(self) -> dict[str, Any]:
        """What defines the study: a later invocation that differs here is refused (tune.trials may grow)."""
        return {"methods": list(self.methods),
                "space": {m: {s.path: s.spec() for s in self.space[m]} for m in self.methods},
                "metric": self.metric, "direction": self.direction, "seed": self.seed, "sampler": dict(self.sampler),
                "pruner": dict(self.pruner), "teacher_cache": self.teacher_cache, "baseline": self.baseline,
                "enqueue": [dict(e) for e in self.enqueue]}

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (what the worker processes are given)."""
        return {**self.identity(), "trials": self.trials, "jobs": self.jobs, "threads": self.threads,
                "timeout": self.timeout, "storage": self.storage, "max_failures": self.max_failures}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TuneSettings":
        """The inverse of as_dict (in a worker process)."""
        space = {m: tuple(_leaf(m, path, spec) for path, spec in settings.items())
                 for m, settings in data["space"].items()}
        return cls(methods=tuple(data["methods"]), space=space, trials=data["trials"], jobs=data["jobs"],
                   threads=data["threads"], timeout=data["timeout"], metric=data["metric"],
                   direction=data["direction"], storage=data["storage"], seed=data["seed"],
                   sampler=dict(data["sampler"]), pruner=dict(data["pruner"]), teacher_cache=data["teacher_cache"],
                   baseline=data["baseline"], enqueue=tuple(dict(e) for e in data["enqueue"]),
                   max_failures=data["max_failures"])


# --------------------------------------------------------------------------- checks of single values
def _whole(key: str, value: Any, minimum: int, allow_null: bool = False) -> int | None:
    if value is None and allow_null:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        null = " or null" if allow_null else ""
        raise ConfigError(f"{key} must be a whole number >= {minimum}{null}, got {value!r}")
    return int(value)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def _one_of(key: str, value: Any, options: Sequence[str]) -> str:
    if str(value).lower() not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}, got {value!r}")
    return str(value).lower()


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


# --------------------------------------------------------------------------- the search space
def _leaf(method: str, path: str, spec: Mapping[str, Any]) -> Setting:
    """One range or list of choices, checked."""
    key = f"tune.space.{method}.{path}"
    if "choices" in spec:
        unknown = sorted(set(spec) - {"choices"})
        if unknown:
            raise ConfigError(f"{key} has choices and {unknown[0]!r}; a categorical setting takes only choices")
        choices = spec["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(f"{key}.choices must be a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{key}.choices holds {c!r}; choices must be numbers, strings, true/false or null")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{key}.choices lists a value twice: {list(choices)}")
        return Setting(method, path, "categorical", choices=tuple(choices))
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a range key; a range takes low, high, log and type "
                          f"(float or int), or use choices: [...]")
    if "low" not in spec or "high" not in spec:
        missing = "low" if "low" not in spec else "high"
        raise ConfigError(f"{key} needs both low and high (it has no {missing}), e.g. {{low: 1.0, high: 8.0}}")
    kind = _one_of(f"{key}.type", spec.get("type", "float"), ("float", "int"))
    low, high = _number(f"{key}.low", spec["low"]), _number(f"{key}.high", spec["high"])
    if kind == "int" and (float(low) != int(low) or float(high) != int(high)):
        raise ConfigError(f"{key} is an int range, so low and high must be whole numbers, got {low} and {high}")
    if not low < high:
        raise ConfigError(f"{key}.low must be below its high, got low {low} and high {high}; for one fixed value "
                          f"set the key itself instead ({path}={low})")
    log = _flag(f"{key}.log", spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{key} is searched on a log scale, so low must be > 0, got {low}")
    if kind == "int":
        low, high = int(low), int(high)
    else:
        low, high = float(low), float(high)
    return Setting(method, path, kind, low=low, high=high, log=log)


def _walk(method: str, node: Any, prefix: str) -> list[Setting]:
    """The settings of one method's space: nested keys down to the ranges."""
    if not isinstance(node, Mapping):
        where = f"tune.space.{method}" + (f".{prefix}" if prefix else "")
        raise ConfigError(f"{where} must be a range {{low: .., high: ..}}, {{choices: [..]}} or a mapping of config "
                          f"keys to them, got {node!r}")
    if prefix and set(node) & LEAF_MARKERS:
        return [_leaf(method, prefix, node)]
    found: list[Setting] = []
    for name, child in node.items():
        found.extend(_walk(method, child, f"{prefix}.{name}" if prefix else str(name)))
    return found


def parse_space(space: Mapping[str, Any] | None, methods: Sequence[str]) -> dict[str, tuple[Setting, ...]]:
    """The settings of each method in `methods`; a method without an entry in tune.space is refused."""
    space = dict(space or {})
    parsed: dict[str, tuple[Setting, ...]] = {}
    for method in methods:
        if method not in space:
            raise ConfigError(f"tune.space has no search space for method {method}; add one, e.g. "
                              f"'+tune.space.{method}={{distill: {{weight: {{low: 0.1, high: 10.0, log: true}}}}}}' "
                              f"(or {{}} to run it at its preset's values), or drop {method} from tune.methods")
        parsed[method] = tuple(_walk(method, space[method] if space[method] is not None else {}, ""))
        paths = [s.path for s in parsed[method]]
        if "distill.method" in paths:
            raise ConfigError(f"tune.space.{method}.distill.method cannot be searched; the methods are tune.methods")
    if len(methods) == 1 and not parsed[methods[0]]:
        m = methods[0]
        raise ConfigError(f"the search space is empty: tune.space.{m} has no settings and {m} is the only method in "
                          f"tune.methods, so there is nothing to search; give it settings "
                          f"(tune.space.{m}.distill.temperature={{low: 1.0, high: 8.0}}) or add methods")
    return parsed


# --------------------------------------------------------------------------- trials to run first
def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in node.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def parse_enqueue(entries: Any, methods: Sequence[str], space: Mapping[str, Sequence[Setting]]) -> tuple[dict, ...]:
    """[{method, params: {path: value}}] from tune.enqueue's [{method: kd, distill: {temperature: 2.0}}, ...]."""
    if entries is None:
        return ()
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"tune.enqueue must be a list of trials like [{{method: kd, distill: {{temperature: 2.0}}}}], "
                          f"got {entries!r}")
    parsed = []
    for i, entry in enumerate(entries):
        key = f"tune.enqueue[{i}]"
        if not isinstance(entry, Mapping) or "method" not in entry:
            raise ConfigError(f"{key} must name its method, e.g. {{method: kd, distill: {{temperature: 2.0}}}}, "
                              f"got {entry!r}")
        method = str(entry["method"])
        if method not in methods:
            raise ConfigError(f"{key}.method is {method}, which is not in tune.methods ({', '.join(methods)})")
        settings = {s.path: s for s in space[method]}
        params = _flatten({k: v for k, v in entry.items() if k != "method"})
        for path, value in params.items():
            if path not in settings:
                searched = ", ".join(settings) or "none"
                raise ConfigError(f"{key}.{path} is not a searched setting of {method} (searched: {searched}); "
                                  f"add it to tune.space.{method} or drop it")
            if not settings[path].contains(value):
                raise ConfigError(f"{key}.{path} is {value!r}, outside {settings[path].key} "
                                  f"({settings[path].describe()})")
        parsed.append({"method": method, "params": params})
    return tuple(parsed)


# --------------------------------------------------------------------------- the whole section
def parse_settings(tune: Mapping[str, Any], checkpoint: Mapping[str, Any] | None,
                   presets: Sequence[str]) -> TuneSettings:
    """The checked `tune` section. `presets`: the names `distill=` accepts (conf/distill/*.yaml and the user's)."""
    tune = dict(tune or {})
    known = {"methods", "trials", "jobs", "threads", "timeout", "metric", "direction", "storage", "seed", "sampler",
             "pruner", "teacher_cache", "baseline", "enqueue", "max_failures", "space"}
    unknown = sorted(set(tune) - known)
    if unknown:
        raise ConfigError(f"tune.{unknown[0]} is not a kdx-tune setting; the settings are {', '.join(sorted(known))}")
    methods = tune.get("methods")
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, (list, tuple)) or not methods:
        raise ConfigError(f"tune.methods must list at least one distill preset, e.g. tune.methods=[kd,dkd], got {methods!r}")
    methods = [str(m) for m in methods]
    for m in methods:
        if m not in presets:
            raise ConfigError(f"tune.methods: {m!r} is not a distill preset; choose from {', '.join(sorted(presets))} "
                              f"(conf/distill/*.yaml)")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ConfigError(f"tune.methods lists {twice[0]} more than once; list each method once")
    space = parse_space(tune.get("space"), methods)

    checkpoint = dict(checkpoint or {})
    monitor = checkpoint.get("monitor")
    metric = tune.get("metric") or monitor
    if not metric:
        raise ConfigError("kdx-tune needs a validation metric to optimise: set tune.metric=val/acc1 (or checkpoint.monitor)")
    metric = str(metric)
    if not metric.startswith("val/"):
        raise ConfigError(f"tune.metric must be a validation metric (val/...), got {metric!r}; kdx-tune chooses on the "
                          f"validation split only, never on test metrics")
    direction = tune.get("direction")
    if direction is None:
        if metric != monitor:
            raise ConfigError(f"tune.direction is needed for tune.metric={metric} (it is not checkpoint.monitor, whose "
                              f"mode would say): set tune.direction=maximize or minimize")
        direction = "maximize" if str(checkpoint.get("mode", "max")).lower() == "max" else "minimize"
    direction = _one_of("tune.direction", direction, DIRECTIONS)

    sampler = dict(tune.get("sampler") or {})
    extra = sorted(set(sampler) - {"name", "startup_trials"})
    if extra:
        raise ConfigError(f"tune.sampler.{extra[0]} is not a sampler setting; use tune.sampler.name or startup_trials")
    sampler = {"name": _one_of("tune.sampler.name", sampler.get("name", "tpe"), SAMPLERS),
               "startup_trials": _whole("tune.sampler.startup_trials", sampler.get("startup_trials", 10), 0)}
    pruner = dict(tune.get("pruner") or {})
    extra = sorted(set(pruner) - {"name", "min_epochs", "startup_trials", "reduction_factor"})
    if extra:
        raise ConfigError(f"tune.pruner.{extra[0]} is not a pruner setting; use name, min_epochs, startup_trials or "
                          f"reduction_factor")
    pruner = {"name": _one_of("tune.pruner.name", pruner.get("name", "median"), PRUNERS),
              "min_epochs": _whole("tune.pruner.min_epochs", pruner.get("min_epochs", 1), 1),
              "startup_trials": _whole("tune.pruner.startup_trials", pruner.get("startup_trials", 3), 0),
              "reduction_factor": _whole("tune.pruner.reduction_factor", pruner.get("reduction_factor", 3), 2)}
    cache = tune.get("teacher_cache", "auto")
    cache = "off" if cache is False else _one_of("tune.teacher_cache", cache, ("auto", "off"))
    timeout = tune.get("timeout")
    if timeout is not None and (_number("tune.timeout", timeout) <= 0):
        raise ConfigError(f"tune.timeout must be a number of seconds > 0 or null, got {timeout!r}")
    storage = tune.get("storage")
    if storage is not None and (not isinstance(storage, str) or "://" not in storage):
        raise ConfigError(f"tune.storage must be a database URL such as sqlite:///PATH/study.db, or null (the study "
                          f"folder's study.db), got {storage!r}")
    seed = tune.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"tune.seed must be a whole number, got {seed!r}")
    return TuneSettings(
        methods=tuple(methods), space=space,
        trials=_whole("tune.trials", tune.get("trials", 20), 1),
        jobs=_whole("tune.jobs", tune.get("jobs", 1), 1),
        threads=_whole("tune.threads", tune.get("threads"), 1, allow_null=True),
        timeout=float(timeout) if timeout is not None else None,
        metric=metric, direction=direction, storage=storage, seed=int(seed), sampler=sampler, pruner=pruner,
        teacher_cache=cache, baseline=_flag("tune.baseline", tune.get("baseline", True)),
        enqueue=parse_enqueue(tune.get("enqueue"), methods, space),
        max_failures=_whole("tune.max_failures", tune.get("max_failures", 3), 1))


# --------------------------------------------------------------------------- override text
_PLAIN = re.compile(r"[A-Za-z_/.][\w./-]*")  # names and paths: Hydra reads them unquoted


def override_value(value: Any) -> str:
    """`value` as Hydra's override grammar reads it back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in ("true", "false", "null", "none", "inf", "nan"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------- the command line and the storage
def override_key(override: str) -> str:
    """The key of a Hydra override (`+a.b=1` -> a.b)."""
    return override.lstrip("+~").split("=", 1)[0]


def base_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's kdx-train overrides that every trial gets: all but tune.*; the ones kdx-tune decides are refused."""
    base = []
    for o in overrides:
        key = override_key(o)
        if key == "tune" or key.startswith("tune."):
            continue
        if key in REFUSED:
            value = o.split("=", 1)[1] if "=" in o else ""
            raise ConfigError(f"{o}: {REFUSED[key].format(value=value)}")
        base.append(o)
    return base


def storage_url(settings: TuneSettings, study_dir: Path) -> str:
    return settings.storage or f"sqlite:///{(study_dir / STUDY_DB).resolve()}"


def check_storage(url: str) -> None:
    """A SQLite storage's folder must take a new file (and an existing database must open for writing)."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///"):]).expanduser()
    fix = "choose a writable study folder (hydra.run.dir=DIR) or tune.storage=sqlite:///WRITABLE/PATH.db"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".kdx-tune-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as e:
        raise ConfigError(f"tune.storage: the study database {path} cannot be written ({e.strerror or e}); {fix}") from None
