"""Where a training run writes its checkpoints: last.pt every epoch, best.pt on a new best fitness,
epoch<N>.pt every ``save_period`` epochs, last.pt on Ctrl-C/SIGTERM and when a non-finite run stops
(all through utils.checkpoint.save_checkpoint, which writes atomically)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from utils.checkpoint import save_checkpoint

LOGGER = logging.getLogger(__name__)


class CheckpointFiles:
    """The checkpoint files of one run folder ``wdir``; only the main process writes."""

    def __init__(self, wdir: Path, save_period: int, main: bool):
        self.wdir, self.save_period, self.main = Path(wdir), save_period, main
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"

    def save_epoch(self, ckpt: dict, epoch: int, is_best: bool) -> None:
        save_checkpoint(ckpt, self.last)
        if is_best:
            save_checkpoint(ckpt, self.best)
        if self.save_period > 0 and epoch % self.save_period == 0:
            save_checkpoint(ckpt, self.wdir / f"epoch{epoch}.pt")

    def save_interrupted(self, checkpoint: Callable[[], dict], epoch: int) -> None:
        """Ctrl-C/SIGTERM: the current weights as last.pt; a resume repeats the interrupted epoch.
        ``checkpoint`` builds the checkpoint (only the main process calls it)."""
        if self.main:
            save_checkpoint(checkpoint(), self.last)
            LOGGER.warning(f"Interrupted during epoch {epoch}: saved {self.last}; continue with --resume {self.last}")

    def keep_last_good(self, checkpoint: Callable[[], dict], epoch: int) -> None:
        """Non-finite stop: skipped steps never changed the weights, so they are still the last good ones
        (``checkpoint`` is built only when last.pt does not exist yet)."""
        if self.main and not self.last.exists():
            save_checkpoint(checkpoint(), self.last)
        if self.main:
            LOGGER.error(f"Non-finite training stopped at epoch {epoch}; last good weights in {self.last}")
