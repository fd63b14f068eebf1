"""Which identities of a face folder kdx-eval scores: by default none that the model was trained on.

A kdx face checkpoint records its training identities (the margin head's class names); the run folder it
sits in (`<run>/checkpoints/best.ckpt`, with `<run>/config.yaml`) records how its data module split the
identities into training, validation and test. kdx-eval uses that split (`--identities auto`, the default):
the test identities of the run when the folder is the one the run used, else every identity the model was
not trained on. `--identities all` scores every identity, and says how many were trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kdx.configs import build_datamodule
from kdx.errors import ConfigError
from kdx.io import safe_torch_load

IDENTITY_MODES = ("auto", "test", "unseen", "all")
# data modules whose identity split kdx-eval may rebuild from a run's config.yaml (no other code is run)
SPLIT_DATAMODULES = ("kdx.data.face.FaceFolderDataModule", "kdx.data.face.ORLFacesDataModule",
                     "kdx.data.FaceFolderDataModule", "kdx.data.ORLFacesDataModule")


@dataclass
class RecordedSplit:
    """The identities a model was trained on and, when its run's config is at hand, the run's whole split."""

    train: list[str]
    validation: list[str] | None = None  # None: unknown (no run config next to the checkpoint)
    test: list[str] | None = None        # [] when the run's test pairs reused the validation identities
    root: Path | None = None             # the face folder of the run
    note: str = ""                       # why the run's split could not be used, if so
    test_pairs: list | None = None       # the run's own test pairs (what its test metrics were measured on)
    test_pairs_how: str = ""             # how the run built them (its data keys)
    flip_eval: bool = True               # whether the run's test added the flipped images' embeddings


@dataclass
class Selection:
    """The identities kdx-eval scores and how they were chosen (printed and written to --out)."""

    mode: str
    used: list[str]
    left_out: dict[str, list[str]] = field(default_factory=dict)
    description: str = ""
    pairs_note: str = ""  # which pairs of these identities are scored, when that needs saying

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "used": self.used, "left_out": self.left_out, "description": self.description,
                **({"pairs": self.pairs_note} if self.pairs_note else {})}


def _run_split(ckpt: Path, train: list[str]) -> RecordedSplit:
    """Add the run's validation/test identities from `<run>/config.yaml`, when present and consistent."""
    split = RecordedSplit(train=train)
    config_path = ckpt.parent.parent / "config.yaml" if ckpt.parent.name == "checkpoints" else None
    if config_path is None or not config_path.is_file():
        split.note = "no run config.yaml next to the checkpoint's folder"
        return split
    data = OmegaConf.to_container(OmegaConf.load(config_path).get("data") or {}, resolve=False)
    target = str(data.get("_target_", ""))
    if target not in SPLIT_DATAMODULES:
        split.note = f"the run's data ({target or 'unknown'}) is not a face folder"
        return split
    try:
        dm = build_datamodule(OmegaConf.create(data))
        run_train = list(dm.train_identities)
    except Exception as e:  # the run's folder moved, or its config no longer builds
        split.note = f"the run's data module cannot be rebuilt ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        return split
    if sorted(run_train) != sorted(train):
        split.note = "the run's config.yaml gives other training identities than the checkpoint"
        return split
    split.validation, split.test = list(dm.held_out_identities), list(dm.test_identities_held_out)
    split.root = Path(dm.root).resolve()
    task = OmegaConf.to_container(OmegaConf.load(config_path).get("task") or {}, resolve=False)
    split.flip_eval = bool(task.get("flip_eval", True)) if isinstance(task, dict) else True
    if split.test and getattr(dm, "pairs_file", None) is None:
        split.test_pairs = list(dm.test_pairs)
        split.test_pairs_how = f"data.num_test_pairs={dm.num_test_pairs}, seeded with data.seed + 1 = {dm.seed + 1}"
    return split


def recorded_split(model_path: str | Path) -> RecordedSplit | None:
    """The split recorded for a kdx face checkpoint; None for a model that records none (ONNX, other files)."""
    path = Path(model_path).expanduser()
    if path.suffix.lower() == ".onnx" or not path.is_file():
        return None
    try:
        ckpt = safe_torch_load(path, what="model file")
    except Exception:  # load_embedding_model reports unreadable files itself
        return None
    meta = ckpt.get("kdx") if isinstance(ckpt, dict) else None
    names = list((meta or {}).get("class_names") or [])
    if not names:
        return None
    return _run_split(path, [str(n) for n in names])


def _short(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def select_identities(identities: dict[str, list[str]], folder: Path, split: RecordedSplit | None,
                      mode: str = "auto") -> tuple[dict[str, list[str]], Selection]:
    """The identities of `folder` to score under `mode` (see IDENTITY_MODES), and how they were chosen."""
    if mode not in IDENTITY_MODES:
        raise ConfigError(f"--identities must be one of {', '.join(IDENTITY_MODES)}, got {mode!r}")
    names = sorted(identities)
    same_folder = split is not None and split.root is not None and split.root == Path(folder).resolve()
    if mode == "all":
        trained = sorted(set(names) & set(split.train)) if split else []
        warn = (f"; {len(trained)} of them were trained on, so the scores are optimistic" if trained else
                "" if split else "; the model records no training identities")
        return identities, Selection("all", names, {}, f"all {len(names)} identities{warn}")
    if mode == "test" or (mode == "auto" and same_folder and split.test):
        if not same_folder or not split.test:
            why = ("the model records no identity split" if split is None else split.note or
                   ("its run used another folder" if not same_folder else "its run set no test identities"))
            raise ConfigError(f"--identities test needs the run's test identities, but {why}; "
                              f"use --identities unseen (every identity not trained on) or all")
        used = [n for n in names if n in set(split.test)]
        left = {"training": [n for n in names if n in set(split.train)],
                "validation": [n for n in names if n in set(split.validation or [])]}
        return ({n: identities[n] for n in used},
                Selection(mode, used, left, f"{len(used)} test identities of the run's split ({_short(used)}); left out: "
                          f"{len(left['training'])} trained on, {len(left['validation'])} used for validation"))
    if split is None:
        if mode == "unseen":
            raise ConfigError("--identities unseen needs the model's training identities, which only kdx face "
                              "checkpoints record; use --identities all")
        return identities, Selection("all", names, {}, f"all {len(names)} identities (the model records no "
                                                      f"training identities)")
    if split.root is not None and not same_folder and mode == "auto":
        return identities, Selection("all", names, {}, f"all {len(names)} identities (the model was trained on "
                                                      f"another folder, {split.root})")
    trained = set(split.train)
    used = [n for n in names if n not in trained]
    left = {"training": [n for n in names if n in trained]}
    if not used:
        raise ConfigError(f"every identity in {folder} was trained on by this model; score another folder, or pass "
                          f"--identities all to score the training identities anyway")
    return ({n: identities[n] for n in used},
            Selection("unseen", used, left, f"{len(used)} identities the model was not trained on ({_short(used)}); "
                                            f"left out: {len(left['training'])} trained on"))
