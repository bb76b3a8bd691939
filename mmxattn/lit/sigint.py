"""Holding a Ctrl-C back while the optimizer changes the weights.

A ``KeyboardInterrupt`` raised in the middle of ``optimizer.step`` (or right after it, before Lightning counts the
batch as done) leaves some or all parameters and moments stepped while the loop's progress says the batch never
ran: a run resumed from the interrupt's checkpoint redoes that batch on top of the stepped weights (a second,
partial update). :class:`SigintDeferral` turns a Ctrl-C that arrives in that stretch into a flag; the training
module raises the ``KeyboardInterrupt`` itself once the batch is counted (``on_train_batch_end``), where Lightning's
restart logic resumes at the next batch. A second Ctrl-C stops at once, as before. Gradient caching
(``grad_cache_chunk_size``) holds it back from its first chunk's backward on: from then on ``.grad`` holds part of
the batch, which neither a redo of the batch nor the saved gradients of an accumulation window could account for.

Only Python's default SIGINT handler is replaced, only in the main thread, and only between ``start`` and
``stop``; a handler left installed by an exception that skipped ``stop`` behaves like the default one the first
time it runs (it raises ``KeyboardInterrupt`` and puts the default handler back).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

_MESSAGE = (
    b"\nCtrl-C: finishing this training step, then stopping (the interrupt checkpoint, where there is one, is "
    b"written then); Ctrl-C again to stop at once\n"
)


def _never() -> bool:
    return False


class SigintDeferral:
    """``start(still_deferring)`` / ``stop() -> bool`` (whether a Ctrl-C came in between). ``still_deferring`` is
    asked when a Ctrl-C arrives: False (the run is no longer in its training loop) makes it an ordinary one."""

    def __init__(self) -> None:
        self.pending = False
        self._installed = False
        self._still_deferring: Callable[[], bool] = _never

    def __getstate__(self) -> dict[str, Any]:  # a pickled module (ddp_spawn) carries no handler state
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    @property
    def active(self) -> bool:
        return self._installed

    def start(self, still_deferring: Callable[[], bool]) -> None:
        self._still_deferring = still_deferring
        if self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; Ctrl-C stays as it is
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # someone else's handler (or SIGINT ignored): theirs to decide
        self.pending = False
        signal.signal(signal.SIGINT, self._handle)
        self._installed = True

    def stop(self) -> bool:
        """Put Python's default handler back (if this one is installed); whether a Ctrl-C was held back."""
        self._still_deferring = _never
        if self._installed:
            self._installed = False
            if signal.getsignal(signal.SIGINT) == self._handle:  # not if someone replaced it meanwhile
                signal.signal(signal.SIGINT, signal.default_int_handler)
        pending, self.pending = self.pending, False
        return pending

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending or not self._still_deferring():
            self.stop()
            raise KeyboardInterrupt
        self.pending = True
        try:
            os.write(2, _MESSAGE)  # not print: a signal handler may run in the middle of a write to sys.stderr
        except OSError:
            pass
