"""Ctrl-C and SIGTERM during a run: the SIGINT handler around training, and telling an interrupt from a failure."""
from __future__ import annotations

import signal
import threading
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kdx.train.trainer import InterruptState


def is_interrupt(error: BaseException, trainer: pl.Trainer | None) -> bool:
    """True for Ctrl-C and SIGTERM: Lightning turns Ctrl-C during fit/test into SystemExit(1) after marking
    the trainer interrupted, and SIGTERM into SIGTERMException."""
    if isinstance(error, (KeyboardInterrupt, SIGTERMException)):
        return True
    return isinstance(error, SystemExit) and trainer is not None and bool(getattr(trainer, "interrupted", False))


def interrupt_name(error: BaseException) -> str:
    """SIGTERM or Ctrl-C, as results and messages name the interrupt."""
    return "SIGTERM" if isinstance(error, SIGTERMException) else "Ctrl-C"


def watch_sigint() -> tuple[Any, list]:
    """Note Ctrl-C (SIGINT) in a list; the first one while a Trainer runs is left to
    kdx.train.trainer.InterruptCheck (acted on at the next batch boundary), any other interrupts at once.
    Returns (the previous handler, the list)."""
    previous = signal.getsignal(signal.SIGINT)
    hits: list = []
    InterruptState.requested = 0
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        return previous, hits

    def note(signum, frame):
        hits.append(signum)
        InterruptState.requested += 1
        if InterruptState.cooperative and InterruptState.requested == 1:
            return
        if callable(previous):
            previous(signum, frame)  # Python's default handler raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    return previous, hits


def restore_sigint(handler: Any) -> None:
    """Put back the Ctrl-C handler Lightning replaced (it ignores SIGINT after a first Ctrl-C, for good)."""
    InterruptState.cooperative = False
    if threading.current_thread() is threading.main_thread() and handler is not None:
        try:
            signal.signal(signal.SIGINT, handler)
        except (ValueError, TypeError):  # pragma: no cover
            pass
