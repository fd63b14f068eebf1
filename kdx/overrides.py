"""Command-line overrides that Hydra cannot apply, or would apply silently, told in one sentence.

Three checks:
- `explain_composition_error`: Hydra's multi-line composition errors (a misspelled key, an unknown option of a
  config group, a `+` on a key that exists, a line the override grammar cannot read) become one ConfigError
  that names the override and lists close matches.
- `check_added_keys`: a `+key=value` under one of kdx's own groups adds a key nothing reads (a typo of a real
  key is then silently ignored). Such keys are refused with close matches, unless the group takes open-ended
  keys (pl.Trainer arguments, datamodule arguments, model kwargs, logger options, distillation parameters,
  which their readers check themselves).
- `check_merged_mappings`: `key={}` (or `key={a: 1}`) on a key whose config already holds a mapping is merged
  into it by Hydra, so `distill.mix={}` would keep the preset's mixed methods; an empty mapping that empties
  nothing is refused with the override that does (`key=null`).
`check_overrides` runs the last two on a composed config; every kdx entry point calls it.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class
from omegaconf import OmegaConf

from kdx.errors import ConfigError
from kdx.schemas import TrainerOptions, schema_fields

# Hydra flags that make it print something instead of running: the checks leave those invocations to Hydra.
_VALUE_FLAGS = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--cfg", "-c", "--package",
                "-p", "--info", "-i", "--experimental-rerun", "--shell-completion", "-sc"}
# kdx's own config groups: a `+key` under one of them must be a key something reads. (Top-level keys are
# left alone: a user's own config may interpolate them, e.g. `root: ${my_root}` with `+my_root=...`.)
KDX_GROUPS = ("data", "pair", "task", "distill", "optim", "trainer", "logger", "checkpoint", "teacher", "student",
              "pipeline")
# Groups whose `+`-added keys are passed to code that checks them itself.
_OPEN_PREFIXES = ("hydra.", "distill.", "logger.", "teacher.kwargs.", "student.kwargs.", "teacher.preprocess.",
                  "pipeline.stages.")


def command_line_overrides(argv: Sequence[str]) -> list[str]:
    """The override arguments of a kdx-train/kdx-pipeline command line (flags and their values left out)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("-") and not arg.startswith(("+", "~")):
            name = arg.split("=", 1)[0]
            skip = name in _VALUE_FLAGS and "=" not in arg
            continue
        out.append(arg)
    return out


def _flatten(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        keys = []
        for k, v in node.items():
            if k == "defaults" and not prefix:
                continue
            keys.append(f"{prefix}{k}")
            keys.extend(_flatten(v, f"{prefix}{k}."))
        return keys
    return []


@functools.lru_cache(maxsize=4)
def known_keys(config_dir: str) -> frozenset[str]:
    """Every dotted key any config file under `config_dir` sets, placed by its package (a `# @package
    _global_` file at the root, other files under their group's path)."""
    root = Path(config_dir)
    keys: set[str] = set()
    for path in root.rglob("*.yaml"):
        rel = path.relative_to(root)
        try:
            head = path.read_text().splitlines()[:3]
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception:
            continue
        package = next((ln.split("@package", 1)[1].strip() for ln in head if "@package" in ln), None)
        if package == "_global_" or len(rel.parts) == 1:
            prefix = ""
        elif package:
            prefix = package.replace("_group_", ".".join(rel.parts[:-1])) + "."
        else:
            prefix = ".".join(rel.parts[:-1]) + "."
        keys.update(prefix + k for k in _flatten(data if isinstance(data, dict) else {}))
    return frozenset(keys)


def key_owners(config_dir: str, key: str) -> list[str]:
    """The `group=option` configs of the key's own group (`data` for data.train_size) that set `key`."""
    group, _, rest = key.partition(".")
    folder = Path(config_dir) / group
    owners = []
    if not rest or not folder.is_dir():
        return owners
    for path in sorted(folder.rglob("*.yaml")):
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception:
            continue
        if isinstance(data, dict) and rest in _flatten(data):
            owners.append(f"{group}={path.relative_to(folder).with_suffix('').as_posix()}")
    return owners


def _close(key: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Close spellings of dotted `key` among `candidates`: first its siblings (same parent), then any key at the
    same depth."""
    parent, _, tail = key.rpartition(".")
    prefix = parent + "." if parent else ""
    depth = key.count(".")
    same_depth = sorted({c for c in candidates if c.count(".") == depth})
    siblings = [c[len(prefix):] for c in same_depth if c.startswith(prefix)]
    close = [prefix + m for m in difflib.get_close_matches(tail, siblings, n=n, cutoff=0.7)]
    return close or difflib.get_close_matches(key, same_depth, n=n, cutoff=0.75)


def _hint(close: Sequence[str]) -> str:
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _signature_keys(obj: Any) -> set[str]:
    """Keyword names `obj` (a class or a callable) accepts, following **kwargs up the class hierarchy."""
    names: set[str] = set()
    classes = inspect.getmro(obj) if inspect.isclass(obj) else (obj,)
    for cls in classes:
        fn = cls.__init__ if inspect.isclass(cls) else cls
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def check_added_keys(cfg: Any, overrides: Sequence[str], config_dir: str) -> None:
    """Raise a ConfigError for a `+key=value` that adds a key no kdx config or reader knows (close matches given).

    Keys under trainer.* are checked against pl.Trainer's arguments (and kdx's own trainer keys), data.*
    against the datamodule's arguments; groups whose readers check their keys themselves are left alone.
    """
    added = [o[1:].split("=", 1)[0] for o in overrides if o.startswith("+") and not o.startswith("++") and "=" in o]
    if not added:
        return
    known = None
    for key in added:
        if key.split(".", 1)[0] not in KDX_GROUPS or "." not in key or key.startswith(_OPEN_PREFIXES):
            continue
        if key.startswith("trainer."):
            import pytorch_lightning as pl  # only for a +trainer.* key: kdx-train's start-up stays light

            accepted = _signature_keys(pl.Trainer.__init__) | set(schema_fields(TrainerOptions))
            name = key.split(".")[1]
            if name not in accepted:
                raise ConfigError(f"+{key}: pl.Trainer has no argument {name!r}{_hint(_close(name, accepted))} "
                                  f"(trainer.* keys are passed to pl.Trainer)")
            continue
        if key.startswith("data."):
            target = OmegaConf.select(cfg, "data._target_", default=None)
            try:
                accepted = _signature_keys(get_class(target)) | {"_target_", "name"} if target else set()
            except Exception:
                accepted = set()
            name = key.split(".")[1]
            if accepted and name not in accepted:
                raise ConfigError(f"+{key}: the datamodule {target} takes no argument {name!r}"
                                  f"{_hint(_close(name, accepted))}")
            continue
        known = known if known is not None else known_keys(config_dir)
        if key not in known:
            close = _close(key, known)
            raise ConfigError(f"+{key} adds a key that no kdx config or code reads, so it would be ignored"
                              f"{_hint(close)}" + ("" if close else "; run kdx-train --cfg job to see the keys"))


def check_merged_mappings(cfg: Any, overrides: Sequence[str]) -> None:
    """Raise a ConfigError for `key={}` when the composed `key` is still a non-empty mapping: Hydra merges a
    mapping override into the one the config holds, so the user's "empty it" did nothing."""
    for override in overrides:
        if override.startswith(("~", "+")) or "=" not in override:
            continue
        key, value = override.split("=", 1)
        if re.fullmatch(r"\{\s*\}", value.strip()) is None:
            continue
        held = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_dict(held) and len(held):
            raise ConfigError(f"{key}={{}} leaves {key} as {OmegaConf.to_container(held)} because Hydra merges a "
                              f"mapping into the one the config holds; write {key}=null to empty it")


def check_overrides(cfg: Any, overrides: Sequence[str], config_dir: str) -> None:
    """The checks of a composed config against its command line: `+key`s nothing reads, and `key={}` overrides
    that empty nothing."""
    check_added_keys(cfg, overrides, config_dir)
    check_merged_mappings(cfg, overrides)


# --------------------------------------------------------------------------- Hydra's composition errors
def _group_options(group: str) -> list[str]:
    try:
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    except Exception:
        return []


def _composed_keys(config_name: str, overrides: Sequence[str]) -> set[str]:
    for attempt in (list(overrides), [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]], []):
        try:
            cfg = compose(config_name=config_name, overrides=attempt)
            return set(_flatten(OmegaConf.to_container(cfg, resolve=False)))
        except Exception:
            continue
    return set()


def explain_composition_error(error: BaseException, argv: Sequence[str], config_dir: str,
                              config_name: str) -> ConfigError:
    """One sentence (a ConfigError) for a Hydra error raised while composing the config of `argv`."""
    message = str(error).strip()
    overrides = command_line_overrides(argv)
    first = message.splitlines()[0] if message else type(error).__name__
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        m = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)' is not in struct", message)
        if m:
            key = m.group(1)
            full = re.search(r"full_key: (\S+)", message)
            key = full.group(1) if full else key
            given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
            others = [o for o in overrides if o != given]
            candidates = _composed_keys(config_name, others) | known_keys(config_dir)
            owners = key_owners(config_dir, key) if key in candidates else []
            if owners:  # a key of another config of the same group (a synthetic-only key on image_folder)
                group = key.split(".", 1)[0]
                chosen = next((o.lstrip("+~") for o in overrides if o.lstrip("+~").split("=", 1)[0] == group), None)
                return ConfigError(f"{given}: {key} is a key of {', '.join(owners[:4])}, not of the {group} config "
                                   f"chosen here{f' ({chosen})' if chosen else ''}; choose one of those or drop {key}")
            close = [c for c in _close(key, candidates) if c != key]
            tail = _hint(close) if close else f"; to add a new key, write +{given.lstrip('+~')}"
            return ConfigError(f"{given}: {key} is not a config key{tail}")
        m = re.search(r"Could not find '([^']+)'", message) or re.search(r"Could not load '([^']+)'", message)
        if m:
            path = m.group(1)
            folder, _, option = path.rpartition("/")
            pairs = [(o, *o.lstrip("+~").split("=", 1)) for o in overrides if "=" in o]
            given = next((o for o, k, v in pairs if f"{k}/{v}" == path), None) or \
                next((o for o, k, v in pairs if path.startswith(k + "/")), None)
            group = given.lstrip("+~").split("=", 1)[0] if given else folder.split("/", 1)[0]
            options = _group_options(folder) if folder else []
            if folder and options:
                sub = folder[len(group) + 1:] + "/" if folder != group else ""
                close = [f"{group}={sub}{c}" for c in difflib.get_close_matches(option, options, n=3, cutoff=0.5)]
                shown = ", ".join(options[:25]) + (f" and {len(options) - 25} more" if len(options) > 25 else "")
                return ConfigError(f"{given or path}: {sub}{option} is not an option of the {group} group"
                                   f"{_hint(close)} (available in {folder}: {shown})")
            return ConfigError(f"config {path!r} does not exist; {first}")
        m = re.search(r"Ambiguous value for argument '([^']+)'", message)
        if m:  # key=a,b is a sweep, which a single run cannot do
            given = m.group(1)
            return ConfigError(f"{given} lists several values, which only a sweep runs: add -m (kdx-train -m ... "
                               f"{given}) for one job per value, or give one value")
        m = re.search(r"An item is already at '([^']+)'", message)
        if m:
            key = m.group(1)
            return ConfigError(f"+{key}: {key} already exists, and + only adds new keys; write {key}=... to change it")
        if type(error).__name__ == "OverrideParseException":
            parser = OverridesParser.create()
            for o in overrides:
                try:
                    parser.parse_overrides([o])
                except Exception:
                    return ConfigError(f"cannot read the override {o!r} ({first}); write key=value, quoting values "
                                       f"with brackets, commas or spaces")
        return ConfigError(f"the config cannot be composed: {first}")
