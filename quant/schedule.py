"""When observers calibrate and when BN statistics freeze, decided per (epoch, batch).

The earlier QAT attempt toggled its freezes inside the batch loop and so took every range from one
batch. Here the state is a pure function of the training position, validated up front: observers
run for at least `min_observer_batches` batches, and nothing but `apply_schedule` flips them.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

from quant.fake_quant import Pow2FakeQuantize

LOGGER = logging.getLogger(__name__)


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, quantizer) for every distinct Pow2FakeQuantize in `model`; shared ones appear once."""
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Pow2FakeQuantize) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


def begin_observation_step(module: nn.Module, _args) -> None:
    """Forward pre-hook of a prepared model: each forward is one observation step for every
    quantizer (shared quantizers merge the ranges of all their tensors before averaging).
    A module-level function, not a closure, so deep copies (EMA) hook their own quantizers."""
    for m in module.modules():
        if isinstance(m, Pow2FakeQuantize):
            m.begin_step()


def set_observers(model: nn.Module, on: bool) -> None:
    """Enable or freeze every observer (a fixed-range quantizer stays fixed either way)."""
    for _, q in iter_quantizers(model):
        q.enable_observer(on)


def set_fake_quant(model: nn.Module, on: bool) -> None:
    for _, q in iter_quantizers(model):
        q.enable_fake_quant(on)


@contextmanager
def flags_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block, where code may switch fake quantization on and off at will; on exit
    every quantizer gets its fake-quant flag back and the model its train/eval mode (reports and
    calibration passes use this so they leave the model as they found it)."""
    flags = [(q, bool(int(q.fake_quant_enabled))) for _, q in iter_quantizers(model)]
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        for q, on in flags:
            q.enable_fake_quant(on)
        model.train(was_training)


def set_bn_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (use running statistics, stop updating them) or unfreeze BN in every fused QAT conv."""
    for module in model.modules():
        toggle = getattr(module, "freeze_bn" if frozen else "unfreeze_bn", None)
        if toggle is not None and hasattr(module, "bn"):
            toggle()


@dataclass(frozen=True)
class QATSchedule:
    """Observers calibrate for the first `observer_epochs` epochs (fractions allowed), on every
    `observer_every`-th batch of that window; BN statistics freeze from epoch `freeze_bn_epoch` on (a
    negative value never freezes). `calibrated_before`: the model was calibrated (PTQ) before training, so
    0 observer epochs is valid (ranges stay as calibrated); without it the stride is lowered so that at
    least `min_observer_batches` batches are observed."""

    observer_epochs: float = 1.0
    freeze_bn_epoch: int = 2
    min_observer_batches: int = 8
    calibrated_before: bool = False
    observer_every: int = 1

    def validate(self, batches_per_epoch: int) -> None:
        """Refuse schedules that would calibrate on (almost) nothing, e.g. 0.001 epochs."""
        if not (isinstance(self.observer_every, int) and self.observer_every >= 1):
            raise ValueError(f"--qat-observer-every must be an integer >= 1, got {self.observer_every!r}")
        if self.observer_epochs == 0 and self.calibrated_before:
            return
        batches = self.observer_batches(batches_per_epoch)
        if batches < min(self.min_observer_batches, batches_per_epoch):
            raise ValueError(f"--qat-observer-epochs {self.observer_epochs} gives {batches} calibration "
                             f"batch(es) of {batches_per_epoch} per epoch; use at least "
                             f"{self.min_observer_batches} batches (or one whole epoch)")

    def observer_batches(self, batches_per_epoch: int) -> int:
        """Batches in the observer window: fractions of a batch count as a whole one."""
        # Round first: 1.1 * 100 is 110.00000000000001 in floating point, which is 110 batches, not 111.
        return math.ceil(round(self.observer_epochs * batches_per_epoch, 9))

    def observer_stride(self, batches_per_epoch: int) -> int:
        """Observers count every this many batches of the window: ``observer_every``, lowered (when the
        model was not calibrated before) so that at least ``min_observer_batches`` batches are observed."""
        if self.calibrated_before:
            return self.observer_every
        return max(1, min(self.observer_every, self.observer_batches(batches_per_epoch) // self.min_observer_batches))

    def in_observer_window(self, epoch: int, batch_i: int, batches_per_epoch: int) -> bool:
        return epoch * batches_per_epoch + batch_i < self.observer_batches(batches_per_epoch)

    def observers_on(self, epoch: int, batch_i: int, batches_per_epoch: int) -> bool:
        """Whether this batch is observed: in the window, and on the stride (the window's first batch is)."""
        position = epoch * batches_per_epoch + batch_i
        return (self.in_observer_window(epoch, batch_i, batches_per_epoch)
                and position % self.observer_stride(batches_per_epoch) == 0)

    def bn_frozen(self, epoch: int) -> bool:
        return 0 <= self.freeze_bn_epoch <= epoch


class ScheduleState:
    """Applies a QATSchedule to a model, flipping flags only when the schedule's answer changes.
    ``window``: inside the observer window (observers may still skip this batch, by the stride);
    ``observers``: observing this batch."""

    def __init__(self, schedule: QATSchedule, batches_per_epoch: int):
        schedule.validate(batches_per_epoch)
        self.schedule, self.nb = schedule, batches_per_epoch
        self.observers: bool | None = None
        self.window: bool | None = None
        self.bn_frozen: bool | None = None

    def step(self, model: nn.Module, epoch: int, batch_i: int = 0) -> None:
        observers = self.schedule.observers_on(epoch, batch_i, self.nb)
        if observers != self.observers:
            set_observers(model, observers)
            self.observers = observers
        window = self.schedule.in_observer_window(epoch, batch_i, self.nb)
        if window != self.window:
            if self.window is not None or not window:
                stride = self.schedule.observer_stride(self.nb)
                every = f" every {stride} batches" if stride > 1 else ""
                LOGGER.info(f"QAT: observers {'calibrating' + every if window else 'frozen'} "
                            f"(epoch {epoch}, batch {batch_i})")
            self.window = window
        frozen = self.schedule.bn_frozen(epoch)
        if frozen != self.bn_frozen:
            set_bn_frozen(model, frozen)
            if frozen:
                LOGGER.info(f"QAT: BN statistics frozen from epoch {epoch}")
            self.bn_frozen = frozen
