"""Face-verification scores of an embedding model on a face folder, a pairs file or a .bin file: `verify(args)`,
what `kdx-eval MODEL DATA` (kdx.cli.eval_main) runs with its parsed arguments."""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdx.checkpoints import load_embedding_model
from kdx.data.face import FaceTransform, VerificationPairsDataset, VerificationTensorDataset, orl_faces_root
from kdx.data.face_formats import build_verification_pairs, load_pairs, read_verification_bin
from kdx.data.images import IMAGE_EXTENSIONS, list_identity_folder
from kdx.eval.embeddings import embed_dataset
from kdx.eval.identities import Selection, recorded_split, select_identities
from kdx.io import atomic_write_text
from kdx.metrics.verification import verification_metrics


DEFAULT_NUM_PAIRS = 6000  # pairs built from a face folder when --num-pairs is not given


def _dataset(args, split=None):
    """(verification dataset, Selection of identities or None) of args.data; a face folder is limited to the
    identities `--identities` picks from the model's recorded split (kdx.eval.identities)."""
    data = Path(args.data).expanduser()
    extensions = args.extensions or IMAGE_EXTENSIONS
    if args.data == "orl" and not data.exists():
        data, extensions = orl_faces_root(), args.extensions or (".pgm",)
    transform = FaceTransform(args.image_size, args.in_chans, args.mean, args.std)
    if data.is_dir():
        identities, selection = select_identities(list_identity_folder(data, extensions), data, split, args.identities)
        if split is not None and split.test_pairs and selection.used == sorted(split.test):
            if args.num_pairs is None:  # the run's own test pairs: the same number as its test/verif_acc
                if args.flip is None:
                    args.flip = split.flip_eval
                flip = f"{'with' if args.flip else 'without'} flipped images"
                same = "as" if args.flip == split.flip_eval else f"unlike (task.flip_eval={split.flip_eval})"
                selection.pairs_note = (f"the run's own test pairs ({split.test_pairs_how}), {flip}, {same} its "
                                        f"test metrics")
                return VerificationPairsDataset(split.test_pairs, transform), selection
            selection.pairs_note = (f"new pairs of the run's test identities (--num-pairs {args.num_pairs}, --seed "
                                    f"{args.seed}), not the {len(split.test_pairs)} its test metrics were measured "
                                    f"on; leave --num-pairs out to score those")
        with warnings.catch_warnings():  # fewer pairs than asked is said on the `pairs` line instead
            warnings.filterwarnings("ignore", message=r"only \d+ same-identity pairs exist")
            pairs = build_verification_pairs(identities, args.num_pairs or DEFAULT_NUM_PAIRS, seed=args.seed)
        return VerificationPairsDataset(pairs, transform), selection
    if data.suffix.lower() == ".bin":
        images, issame = read_verification_bin(data, image_size=args.image_size)
        return VerificationTensorDataset(images, issame.tolist(), args.in_chans, args.mean, args.std), None
    pairs = load_pairs(data, root=args.root)
    return VerificationPairsDataset(pairs, transform), _pairs_note(pairs, split)


def _pairs_note(pairs, split):
    """For a pairs file and a model that records its training identities: how many pairs involve them."""
    if split is None:
        return None
    trained = set(split.train)
    seen = sum(1 for a, b, _ in pairs if Path(a).parent.name in trained or Path(b).parent.name in trained)
    text = (f"{seen} of {len(pairs)} pairs involve identities the model was trained on (by folder name), so the "
            f"scores are optimistic" if seen else "no pair involves an identity the model was trained on")
    return Selection("pairs file", [], {}, text)


def _one(values):
    return values[0] if values is not None and len(values) == 1 else values


def _describe(mean, std, source: str) -> str:
    return f"(x/255 - {_one(mean)}) / {_one(std)} ({source})"


def onnx_input_scaling(args) -> tuple[dict, str | None]:
    """(OnnxEmbeddingModel keyword arguments, a description of the model's input) for an .onnx model; ({}, None)
    for a checkpoint.

    The images reach an ONNX model normalised with 0.5/0.5, which the model wrapper undoes; what the model itself
    takes is then, in this order: --mean/--std when given (on [0, 1] values unless --value-range says otherwise),
    the `normalization` its kdx-export description `<model>.json` records, or raw values in --value-range
    (default 0..255, as external models such as SFace take them).
    """
    from kdx.models.onnx_teacher import recorded_normalization

    model = Path(args.model).expanduser()
    if model.suffix.lower() != ".onnx":
        return {}, None
    kwargs = dict(channel_order=args.channel_order, input_mean=0.5, input_std=0.5, device=args.device)
    data_args = (args.mean, args.std)
    args.mean, args.std = [0.5], [0.5]  # how the data reaches the wrapper (undone there)
    recorded, side = recorded_normalization(model)
    if data_args[0] is not None:
        mean, std, source = data_args[0], data_args[1], "--mean/--std"
    elif recorded is not None:
        mean, std, source = recorded["mean"], recorded["std"], f"recorded in {side.name}"
    else:
        value_range = tuple(args.value_range or (0.0, 255.0))
        kwargs.update(value_range=value_range)
        why = f"{side.name} records no normalisation" if side.is_file() else f"no {side.name} beside it"
        return kwargs, (f"raw values in [{value_range[0]:g}, {value_range[1]:g}] ({why}; --mean/--std set a "
                        f"normalisation)")
    value_range = tuple(args.value_range or (0.0, 1.0))
    kwargs.update(value_range=value_range, mean=mean if isinstance(mean, list) else [mean],
                  std=std if isinstance(std, list) else [std])
    scale = "x/255" if value_range == (0.0, 1.0) else f"x in [{value_range[0]:g}, {value_range[1]:g}]"
    return kwargs, f"({scale} - {_one(kwargs['mean'])}) / {_one(kwargs['std'])} ({source})"


def format_metrics(metrics: dict) -> str:
    """The metrics dict as an aligned two-column text table."""
    width = max(len(k) for k in metrics)
    rows = [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in metrics.items()]
    return "\n".join(rows)


@dataclass
class Verification:
    """What `verify` measured: the model's input scaling (a description), the identities scored (None for a .bin
    file), the pairs' same-identity flags and the metrics (10-fold accuracy, AUC, TAR@FAR, seconds)."""

    scaling: str
    selection: Selection | None
    issame: list
    metrics: dict[str, Any]

    def record(self, model: str, data: str) -> dict[str, Any]:
        """The JSON record `--out` writes."""
        record = {"model": str(model), "data": str(data), "pairs": len(self.issame), "metrics": self.metrics}
        if self.selection is not None:
            record["identities"] = self.selection.as_dict()
        return record


def verify(args) -> Verification:
    """Load args.model (an .onnx embedding model or a kdx face checkpoint), build the verification pairs of args.data
    and score them; the arguments are kdx-eval's (kdx.cli.eval_main). Raises KdxError with one sentence for a bad
    model, data or setting."""
    onnx_kwargs, scaling = onnx_input_scaling(args)
    if scaling is None:  # a checkpoint: the images are normalised as it was trained, here by --mean/--std
        given = args.mean is not None
        args.mean, args.std = args.mean or [0.5], args.std or [0.5]
        scaling = _describe(args.mean, args.std, "--mean/--std" if given else "the default; --mean/--std change it")
    model = load_embedding_model(args.model, args.model_name, **onnx_kwargs)
    dataset, selection = _dataset(args, recorded_split(args.model))
    args.flip = bool(args.flip)  # None (not given) and not the run's own pairs: off
    t0 = time.time()
    emb, flipped, issame = embed_dataset(model, dataset, args.batch_size, args.flip, args.device)
    metrics = verification_metrics(emb, issame, flipped, nrof_folds=args.folds)
    metrics["seconds"] = round(time.time() - t0, 2)
    return Verification(scaling, selection, issame, metrics)


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Write the `--out` JSON record; an existing file is replaced only when the new one is complete."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2))
