"""Tests for quant/schedule.py: the observer/BN schedule as a function of the training position,
its validation, and ScheduleState applying it to a small prepared model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import quant.schedule as schedule_mod
from quant.config import QuantConfig
from quant.fake_quant import Pow2FakeQuantize
from quant.fused import QATConvBnAct
from quant.prepare import prepare
from quant.schedule import QATSchedule, ScheduleState, iter_quantizers, set_bn_frozen, set_observers
from tiny_nets import AddConcatNet


@pytest.fixture()
def model() -> nn.Module:
    torch.manual_seed(0)
    return prepare(AddConcatNet(), torch.zeros(1, 3, 16, 16), QuantConfig()).train()


def _observed(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("min_val", "max_val", "exponent"))}


def _bn_stats(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------- QATSchedule
def test_observer_window_counts_batches_across_epochs():
    half = QATSchedule(observer_epochs=0.5)
    assert half.observer_batches(16) == 8
    assert half.observers_on(0, 7, 16) and not half.observers_on(0, 8, 16) and not half.observers_on(1, 0, 16)
    longer = QATSchedule(observer_epochs=1.5)
    assert longer.observer_batches(10) == 15
    assert longer.observers_on(1, 4, 10) and not longer.observers_on(1, 5, 10)
    assert QATSchedule(observer_epochs=0.25).observer_batches(10) == 3  # part of a batch counts as one
    assert QATSchedule(observer_epochs=1.1).observer_batches(100) == 110  # 1.1 * 100 is 110.00000000000001


def test_observer_stride_observes_every_nth_batch_of_the_window():
    s = QATSchedule(observer_epochs=1.5, observer_every=4, calibrated_before=True)
    observed = [(e, b) for e in range(3) for b in range(10) if s.observers_on(e, b, 10)]
    assert observed == [(0, 0), (0, 4), (0, 8), (1, 2)]  # counted across epochs, within the 15-batch window
    assert s.in_observer_window(1, 3, 10) and not s.observers_on(1, 3, 10) and not s.in_observer_window(1, 5, 10)
    # without a PTQ start the stride is lowered to keep min_observer_batches observed batches
    assert QATSchedule(observer_every=8).observer_stride(16) == 2
    assert QATSchedule(observer_every=8).observer_stride(1000) == 8
    assert QATSchedule(observer_every=8).observer_stride(4) == 1
    with pytest.raises(ValueError, match="--qat-observer-every"):
        QATSchedule(observer_every=0).validate(10)


def test_bn_freeze_epoch():
    s = QATSchedule(freeze_bn_epoch=2)
    assert [s.bn_frozen(e) for e in range(4)] == [False, False, True, True]
    assert not any(QATSchedule(freeze_bn_epoch=-1).bn_frozen(e) for e in range(10))
    assert QATSchedule(freeze_bn_epoch=0).bn_frozen(0)


@pytest.mark.parametrize("epochs, nb", [(0.001, 100), (0.0, 100), (0.05, 100), (0.5, 4), (-1.0, 10)])
def test_validate_refuses_tiny_observer_windows(epochs, nb):
    with pytest.raises(ValueError, match=f"--qat-observer-epochs {epochs}"):
        QATSchedule(observer_epochs=epochs).validate(nb)
    with pytest.raises(ValueError, match="calibration"):
        ScheduleState(QATSchedule(observer_epochs=epochs), nb)


@pytest.mark.parametrize("epochs, nb", [(0.08, 100), (1.0, 4), (1.0, 1), (3.0, 2)])
def test_validate_accepts_enough_batches(epochs, nb):
    QATSchedule(observer_epochs=epochs).validate(nb)  # >= 8 batches, or a whole (short) epoch


# ---------------------------------------------------------------------------------- helpers
def test_iter_quantizers_lists_shared_ones_once(model):
    distinct = {id(m) for m in model.modules() if isinstance(m, Pow2FakeQuantize)}
    named = list(iter_quantizers(model))
    assert len(named) == len(distinct) and len({id(q) for _, q in named}) == len(named)
    calls = sum(1 for n in model.graph.nodes if n.op == "call_module" and str(n.target).startswith("act_quant."))
    assert calls > len([n for n, _ in named if n.startswith("act_quant.")])  # some are called several times


def test_set_observers_keeps_fixed_quantizers_off(model):
    set_observers(model, True)
    for name, q in iter_quantizers(model):
        assert int(q.observer_enabled) == (0 if q.fixed else 1), name
    assert any(q.fixed for _, q in iter_quantizers(model))  # the model input has a fixed scale
    set_observers(model, False)
    assert all(int(q.observer_enabled) == 0 for _, q in iter_quantizers(model))


def test_set_bn_frozen_toggles_every_fused_conv(model):
    fused = [m for m in model.modules() if isinstance(m, QATConvBnAct) and m.bn is not None]
    assert len(fused) == 3
    set_bn_frozen(model, True)
    assert all(m.bn_frozen for m in fused)
    set_bn_frozen(model, False)
    assert not any(m.bn_frozen for m in fused)


# ---------------------------------------------------------------------------------- ScheduleState
def test_schedule_state_applies_window_and_bn_freeze(model, monkeypatch):
    flips = []
    original = schedule_mod.set_observers
    monkeypatch.setattr(schedule_mod, "set_observers", lambda m, on: (flips.append(on), original(m, on)))
    nb = 4
    state = ScheduleState(QATSchedule(observer_epochs=1.0, freeze_bn_epoch=2, min_observer_batches=2), nb)
    gen = torch.Generator().manual_seed(0)
    snapshots = []
    for epoch in range(3):
        for i in range(nb):
            state.step(model, epoch, i)
            model(torch.rand(2, 3, 16, 16, generator=gen) * (1 + epoch + i))  # ranges grow each batch
        snapshots.append((_observed(model), _bn_stats(model)))
    assert flips == [True, False]  # set once on, once off: only when the answer changes
    assert state.observers is False and state.bn_frozen is True
    (obs0, bn0), (obs1, bn1), (obs2, bn2) = snapshots
    assert _same(obs0, obs1) and _same(obs1, obs2)  # no observation after epoch 0
    assert not _same(bn0, bn1)  # epoch 1: BN statistics still update
    assert _same(bn1, bn2)  # epoch 2: frozen


def test_schedule_state_observes_during_window(model):
    state = ScheduleState(QATSchedule(observer_epochs=1.0, min_observer_batches=1), 2)
    state.step(model, 0, 0)
    before = _observed(model)
    model(torch.rand(2, 3, 16, 16))
    assert not _same(before, _observed(model))
    state.step(model, 0, 1)
    assert state.observers is True
    state.step(model, 1, 0)
    frozen = _observed(model)
    model(torch.rand(2, 3, 16, 16) * 10)
    assert _same(frozen, _observed(model))


def test_schedule_state_with_a_stride_keeps_the_window(model, monkeypatch, caplog):
    flips = []
    original = schedule_mod.set_observers
    monkeypatch.setattr(schedule_mod, "set_observers", lambda m, on: (flips.append(on), original(m, on)))
    state = ScheduleState(QATSchedule(observer_epochs=1.0, observer_every=2, calibrated_before=True), 4)
    seen = []
    with caplog.at_level("INFO", logger="quant.schedule"):
        for epoch in range(2):
            for i in range(4):
                state.step(model, epoch, i)
                before = _observed(model)
                model(torch.rand(2, 3, 16, 16) * (1 + 4 * epoch + i))  # a wider range every batch
                seen.append((state.window, state.observers, not _same(before, _observed(model))))
    assert seen[:4] == [(True, True, True), (True, False, False), (True, True, True), (True, False, False)]
    assert all(s == (False, False, False) for s in seen[4:])
    assert flips == [True, False, True, False]
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["QAT: observers frozen"]  # once, at the end


def test_zero_observer_epochs_only_after_calibration():
    with pytest.raises(ValueError, match="--qat-observer-epochs 0"):
        QATSchedule(observer_epochs=0).validate(10)
    ready = QATSchedule(observer_epochs=0, calibrated_before=True)
    ready.validate(10)
    assert not any(ready.observers_on(e, b, 10) for e in range(3) for b in range(10))
    with pytest.raises(ValueError, match="--qat-observer-epochs -1"):
        QATSchedule(observer_epochs=-1, calibrated_before=True).validate(10)
