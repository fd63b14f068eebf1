"""Errors a user can cause, each raised with one sentence that names the thing and what to do."""
from __future__ import annotations


def worker_sentence(message: str) -> str:
    """The sentence of an error raised in a DataLoader worker process. torch re-raises it in the main process as
    the same type built from its whole report ("Caught DataError in DataLoader worker process 0.\nOriginal
    Traceback ...\nkdx.errors.DataError: <sentence>"); that report ends with the sentence, which is all a user needs."""
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    last = message.rstrip().splitlines()[-1]
    name, sep, sentence = last.partition(": ")
    return sentence if sep and " " not in name else last


class KdxError(Exception):
    """Base class of every user-facing kdx error."""

    def __str__(self) -> str:  # the one sentence, also when a DataLoader worker raised it
        return worker_sentence(super().__str__())


class ConfigError(KdxError, ValueError):
    """A config key has a bad value."""


class DataError(KdxError, ValueError):
    """A data folder, file or image cannot be used."""


class CheckpointError(KdxError, ValueError):
    """A checkpoint is missing or does not match the run."""


class ModelNotFoundError(KdxError, KeyError):
    """A model name is not known to any registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep the sentence readable
        return worker_sentence(str(self.args[0])) if self.args else ""


class RunExistsError(KdxError, FileExistsError):
    """An output folder already holds a finished run."""


class RunBusyError(KdxError):
    """Another live process owns the run folder."""


class NonFiniteError(KdxError, FloatingPointError):
    """A loss, a metric or a weight became NaN or infinite: the run stops instead of reporting it."""


class RunInterrupted(KdxError):
    """The run was stopped by Ctrl-C or SIGTERM; it can be resumed."""


class DiskFullError(KdxError, OSError):
    """A disk kdx writes to has no space (ENOSPC) or no quota (EDQUOT) left; what was written before is whole.
    `target` is the file that could not be written, `quota` whether a quota (not the disk) ran out."""

    target: str | None = None
    quota: bool = False
