"""Guards of the training loop: the non-finite step counter and the Ctrl-C handler."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

LOGGER = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients too many times in a row."""


class StepGuard:
    """Counts skipped (non-finite) steps and raises once ``limit`` happen in a row."""

    def __init__(self, limit: int = 10, skipped: int = 0) -> None:
        self.limit, self.skipped, self.in_a_row = limit, skipped, 0
        self.good = self.skipped_here = 0  # steps taken and skipped by this guard (this run, not resumed ones)

    def skip(self, what: str, ni: int) -> None:
        """Record one skipped step (``what`` says why), raising when the limit is reached."""
        self.skipped += 1
        self.skipped_here += 1
        self.in_a_row += 1
        LOGGER.warning(f"WARNING: non-finite {what} at iteration {ni}, step skipped "
                       f"({self.in_a_row} in a row, {self.skipped} in total)")
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(f"training stopped: {self.in_a_row} consecutive steps with non-finite "
                                     f"{what} (iteration {ni}); the last good checkpoint is kept")

    def ok(self) -> None:
        self.in_a_row = 0
        self.good += 1

    def check_progress(self) -> None:
        """At the end of a run: raise when every step was skipped, so the weights never changed (a short
        run may never reach ``limit`` in a row, yet it must not end as a success)."""
        if self.skipped_here and not self.good:
            raise NonFiniteLossError(f"training stopped: all {self.skipped_here} steps had a non-finite loss or "
                                     "gradient norm, not one optimizer step was taken; the weights are unchanged")


class StopOnSigint:
    """While active, Ctrl-C (SIGINT) sets ``trainer.interrupted`` (stop after this batch); a second Ctrl-C aborts.

    Outside DDP, SIGTERM (what schedulers and ``docker stop`` send) stops the same way, so last.pt is saved
    instead of losing the epoch. Under DDP torchrun owns SIGTERM (it stops every rank), so it is left alone.
    Installed only in the main thread (signal handlers can not be set elsewhere).
    """

    def __init__(self, trainer: Any, distributed: bool = False) -> None:
        self.trainer, self.distributed, self.previous = trainer, distributed, {}

    def _handler(self, signum, frame) -> None:
        if self.trainer.interrupted:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        LOGGER.warning(f"{name} received: stopping after this batch and saving last.pt (Ctrl-C again aborts)")
        self.trainer.interrupted = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT] + ([] if self.distributed else [signal.SIGTERM])
            self.previous = {s: signal.signal(s, self._handler) for s in signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
        return False
