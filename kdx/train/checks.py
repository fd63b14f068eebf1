"""Checks that need the set-up data and the built module, run before the Trainer starts: each bad setting is one
ConfigError naming its key, instead of a traceback (or a silent change) after an epoch of training."""
from __future__ import annotations

import difflib
from typing import Any

import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch.utils.data import DataLoader

from kdx.errors import ConfigError

PROBE_IMAGES = 2  # images of the validation batch the module is probed with


def check_batch_size(dm: Any, batch_size: Any) -> None:
    """Refuse a batch larger than the training set (a ConfigError naming data.batch_size).

    Refused rather than clamped: such a batch trains one step per epoch on the whole set, which changes what the
    learning rate and the schedule mean, and it is nearly always a typo or a subset smaller than intended; a
    clamp would hide that and record a batch size that no step used.
    """
    train_set = getattr(dm, "train_set", None)
    try:
        size = len(train_set) if train_set is not None else None
    except TypeError:
        size = None
    if size is None or not isinstance(batch_size, int) or isinstance(batch_size, bool):
        return
    if size == 0:
        raise ConfigError("the training set is empty; check data.root / data.train_size (or the split settings)")
    if batch_size > size:
        raise ConfigError(f"data.batch_size={batch_size} is larger than the training set ({size} images), so each "
                          f"epoch would be one step on the whole set; set data.batch_size to at most {size}")


def _first(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.ndim else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_first(b, n) for b in batch)
    if isinstance(batch, dict):
        return {k: _first(v, n) for k, v in batch.items()}
    return batch


def _probe_batch(dm: Any) -> Any:
    """A small validation batch, built in this process (no loader workers are started)."""
    loader = dm.val_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        indices = next(iter(loader.batch_sampler))[:PROBE_IMAGES]
        return loader.collate_fn([loader.dataset[i] for i in indices])
    return _first(next(iter(loader)), PROBE_IMAGES)


def logged_validation_metrics(module: Any, dm: Any) -> set[str] | None:
    """The names the module logs in one validation epoch (a validation step on two images, then the epoch's
    end), or None when the module cannot be probed outside a Trainer. Nothing of the module, its metrics or the
    random generators is changed."""
    from torchmetrics import Metric

    names: set[str] = set()
    saved = {k: module.__dict__.get(k) for k in ("log", "log_dict")}
    module.log = lambda name, *a, **k: names.add(str(name))
    module.log_dict = lambda values, *a, **k: names.update(str(n) for n in values)
    was_training = module.training
    try:
        with isolate_rng(), torch.no_grad():
            batch = _probe_batch(dm)
            module.eval()
            if hasattr(module, "on_after_batch_transfer"):
                batch = module.on_after_batch_transfer(batch, 0)
            module.on_validation_epoch_start()
            module.validation_step(batch, 0)
            module.on_validation_epoch_end()
    except Exception:  # a module that needs its Trainer (or all pairs) to validate: not probed here
        return None
    finally:
        for key, value in saved.items():
            if value is None:
                module.__dict__.pop(key, None)
            else:
                module.__dict__[key] = value
        module.train(was_training)
        for m in module.modules():
            if isinstance(m, Metric):
                m.reset()
    return names


def check_monitor(module: Any, dm: Any, monitor: Any) -> None:
    """Refuse a `checkpoint.monitor` that the task's validation never logs (a ConfigError naming the key and
    what is logged), before any training; `train/...` metrics and modules that cannot be probed pass."""
    if not isinstance(monitor, str) or not monitor.startswith("val/"):
        return
    names = logged_validation_metrics(module, dm)
    if names is None or monitor in names:
        return
    logged = sorted(n for n in names if n.startswith("val/"))
    close = difflib.get_close_matches(monitor, logged, n=1, cutoff=0.6)
    hint = f"; did you mean checkpoint.monitor={close[0]}?" if close else ""
    raise ConfigError(f"checkpoint.monitor={monitor} is not a metric this task logs (it logs "
                      f"{', '.join(logged) or 'no validation metric'}){hint}")
