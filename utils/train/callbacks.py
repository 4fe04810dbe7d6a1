"""Training records: results.csv with YOLOv5 v7.0's columns, and TensorBoard scalars when it imports.

Example:
    >>> log = ResultsLogger(Path("runs/train/exp"))
    >>> log.log_epoch(0, [0.1, 0.05, 0.02, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01])
    >>> log.close()
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

LOGGER = logging.getLogger(__name__)

# Columns after 'epoch', in upstream's order: mean train losses, val metrics, val losses, lr per group.
RESULT_KEYS = (
    "train/box_loss", "train/obj_loss", "train/cls_loss",
    "metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
    "val/box_loss", "val/obj_loss", "val/cls_loss",
    "x/lr0", "x/lr1", "x/lr2",
)
_WIDTH = 20  # upstream pads every csv field to 20 characters


def _tensorboard_writer(save_dir: Path):
    """A SummaryWriter for ``save_dir``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; results.csv always exists
        LOGGER.info("TensorBoard: not installed, no event files written (pip install tensorboard)")
        return None
    LOGGER.info("TensorBoard: start with 'tensorboard --logdir %s'", save_dir.parent)
    return SummaryWriter(str(save_dir))


class ResultsLogger:
    """Appends one row per epoch to ``save_dir/results.csv`` (header written once, so resumes append)."""

    def __init__(self, save_dir: Path, tensorboard: bool = True) -> None:
        self.csv = Path(save_dir) / "results.csv"
        self.tb = _tensorboard_writer(Path(save_dir)) if tensorboard else None

    def log_epoch(self, epoch: int, values: Sequence[float]) -> None:
        """Record ``values`` (one per RESULT_KEYS entry) for ``epoch``."""
        values = [float(v) for v in values]
        if len(values) != len(RESULT_KEYS):
            raise ValueError(f"results row for epoch {epoch}: {len(values)} values, expected {len(RESULT_KEYS)}")
        if self.csv.exists():
            self._drop_rows_from(epoch)
        header = "" if self.csv.exists() else ",".join(f"{k:>{_WIDTH}s}" for k in ("epoch", *RESULT_KEYS)) + "\n"
        row = ",".join(f"{v:>{_WIDTH}.5g}" for v in (epoch, *values)) + "\n"
        with open(self.csv, "a") as fh:
            fh.write(header + row)
        if self.tb is not None:
            for key, value in zip(RESULT_KEYS, values):
                self.tb.add_scalar(key, value, epoch)

    def _drop_rows_from(self, epoch: int) -> None:
        """Remove rows for ``epoch`` and later: a run killed after its row was written but before
        last.pt was saved repeats that epoch on resume, which must replace the row, not add a second."""
        lines = self.csv.read_text().splitlines(keepends=True)
        keep = lines[:1] + [ln for ln in lines[1:] if ln.strip() and float(ln.split(",", 1)[0]) < epoch]
        if len(keep) != len(lines):
            self.csv.write_text("".join(keep))

    def close(self) -> None:
        """Flush and close TensorBoard (the csv is closed after every row)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
